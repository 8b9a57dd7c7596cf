"""Model code shared by the export (which gates it) and the served model (which runs it): one implementation."""
