"""`make bench-gpu`'s code, run on this CPU at tiny sizes (`--smoke`): every section a device call will run
(the served one on a real tritonserver, through perf_analyzer), so a lent GPU's minutes are not spent on a
bug. What only a GPU runs (FP16 compute, CUDA graphs) is not covered here."""
import json
import subprocess
import sys

from bert_recsys import settings


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "bench.gpu", *args], cwd=settings.REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_pack_then_run_smoke_measures_every_section_and_the_peer_computes_the_same_function(export_dir, tmp_path):
    packed = cli("pack", "--cpu", "--variant", "torch-fp32", "--out", str(tmp_path / "bundle"), "--texts", "32",
                 "--sts-pairs", "40")
    assert packed.returncode == 0, packed.stderr[-2000:]
    assert {p.name for p in (tmp_path / "bundle").iterdir()} == {"repository", "tokenizer", "reference.npz", "texts.json", "site"}
    # The device has no install of the checkout: the bundle's site/ alone must give what the bench imports.
    probe = ("import sys, importlib; sys.path[:] = [p for p in sys.path if p and p.rstrip('/') != sys.argv[1]]\n"
             "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in str(getattr(f, '__module__', ''))]\n"
             "sys.path.insert(0, sys.argv[2])\n"
             "for m in ('bert_recsys.export.gate', 'bert_recsys.server.launcher', 'bert_recsys.model_repository.render',"
             " 'bert_recsys.client.triton'): importlib.import_module(m)\n"
             "import bert_recsys; print(bert_recsys.__file__)")
    staged = subprocess.run([sys.executable, "-c", probe, str(settings.REPO_ROOT), str(tmp_path / "bundle" / "site")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert staged.returncode == 0 and staged.stdout.strip().startswith(str(tmp_path / "bundle" / "site")), staged.stderr[-2000:]
    texts = json.loads((tmp_path / "bundle" / "texts.json").read_text())["s128"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bundle" / "tokenizer")
    lengths = {len(tokenizer(t)["input_ids"]) for t in texts}
    assert len(texts) == len(set(texts)) == 32 and min(lengths) >= 124 and max(lengths) <= 132, lengths

    ran = cli("run", "--smoke", "--bundle", str(tmp_path / "bundle"), "--out", str(tmp_path / "out"))
    assert ran.returncode == 0, (ran.stdout[-2000:], ran.stderr[-3000:])
    sections = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())["sections"]
    assert set(sections) == {"machine", "peak", "gate", "encoder", "served", "peer", "summary"}
    assert not [name for name, section in sections.items() if "error" in section]
    assert sections["gate"]["passed"] and sections["gate"]["cosine_min"] >= 0.9999
    assert sections["gate"]["sts_pairs"] == 40 and abs(sections["gate"]["spearman_ratio"] - 1) < 1e-3
    assert [row["batch"] for row in sections["encoder"]["rows"]] == [1, 4]
    assert sections["served"]["b1"]["p50_ms"] > 0 and sections["served"]["best_sentences_per_s"] > 0
    assert sections["served"]["tokenizer_alone"]["infer_per_s"] > 0
    # The peer is sentence-transformers' own code on the served weights: it must compute the same vectors.
    assert sections["peer"]["min_cosine_to_torch_runtime"] >= 0.9999
    assert sections["summary"]["embed_sentences_per_s"] == sections["served"]["best_sentences_per_s"]
    assert not (tmp_path / "out" / "st-model").exists()
    report = (tmp_path / "out" / "gpu_bench.md").read_text()
    assert "Smoke run" in report and (tmp_path / "out" / "gpu_bench.png").stat().st_size > 10_000


def test_run_without_a_gpu_and_without_smoke_says_so(tmp_path):
    ran = cli("run", "--bundle", str(tmp_path), "--out", str(tmp_path / "out"), timeout=120)
    assert ran.returncode != 0 and "no CUDA device here" in ran.stderr
