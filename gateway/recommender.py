"""The gateway's Recommender: catalog and interactions from a catalog directory (client.catalog), the catalog
index from an IndexStore (embedded through Triton on first start), following the store across rollouts.

The index is embedded by the recommendation encoder (`rec_embed`, make finetune) where the repository serves one,
else by the general `embed`; from the item texts of the default template (client.item_text), centred on the
catalog's mean. An index in the store from another encoder or another template is embedded again.
"""
from __future__ import annotations

import time
from dataclasses import replace

import logs
from client.catalog import load_catalog
from client.index import IndexSettings, IndexStore, build_catalog_index
from client.item_text import DEFAULT_TEMPLATE, TemplateUse, template
from client.recommend import Recommender
from client.triton import TritonClient
from gateway.config import GatewaySettings

log = logs.get("gateway")


def catalog_client(client: TritonClient) -> TritonClient:
    """The recommendation encoder's client when `rec_embed` is served, else `client` itself."""
    rec_settings = replace(client.settings.for_family("rec"), server=client.settings.server)
    rec = TritonClient(client.url, protocol=client.protocol, settings=rec_settings)
    if rec.model_ready(rec_settings.models.embed):
        log.info("the catalog index uses the recommendation encoder %s", rec_settings.models.embed)
        return rec
    rec.close()
    return client


def load_recommender(config: GatewaySettings, client) -> Recommender:
    catalog = load_catalog(config.data_dir)
    items, interactions, errors = catalog.items, catalog.interactions, catalog.errors
    if errors:
        log.warning("%s: skipped %d malformed rows, first: %s", config.data_dir, len(errors), errors[0])
    chosen = template(DEFAULT_TEMPLATE)
    use = TemplateUse.of(chosen, items)
    log.info("item text %s: %d of %d items with a description, %d on title and categories only", use.template,
             use.with_description, use.items, use.fallback)
    client = catalog_client(client)
    store = IndexStore(config.index_store)
    serving = client.encoder_info()["export_manifest_sha256"]
    current = store.load() if store.current_name() is not None else None
    if current is not None and current.encoder.get("export_manifest_sha256") != serving:
        log.info("catalog index %s was embedded by another encoder than the one serving: embedding it again",
                 store.current_name())
        current = None
    if current is not None and current.template != chosen.identity:
        log.info("catalog index %s was embedded from template %s, not %s: embedding it again", store.current_name(),
                 current.template, chosen.identity)
        current = None
    if current is None:
        started = time.perf_counter()
        index = build_catalog_index(client, items, chosen, IndexSettings(centre=True))
        store.switch(store.publish(index))
        log.info("catalog index built through `embed`: %d items in %.1f s -> %s", len(index),
                 time.perf_counter() - started, config.index_store)
    recommender = Recommender(items, store.load(template=chosen.identity), interactions, client, index_store=store)
    if recommender.histories:  # the similar-users matrix (a profile per user): built now, not by a request
        recommender.similar_users(next(iter(recommender.histories)), k=1)
    log.info("recommendations on: %d items, %d users, index %s", len(items), len(recommender.histories),
             store.current_name())
    return recommender
