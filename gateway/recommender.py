"""The gateway's Recommender: catalog and interactions from a catalog directory (client.catalog), the catalog
index from an IndexStore (embedded through Triton's `embed` on first start), following the store across rollouts.

Where the repository also serves the recommendation encoder (`rec_embed`, make finetune), its own index of the
catalog (the store's `rec/` directory) holds the users' interest vectors and the taste of new items
(client.recommend.TasteIndex). Both are embedded from the item texts of the default template (client.item_text)
and centred on the catalog's mean; an index in a store from another encoder or another template is embedded again.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from bert_recsys import logs
from bert_recsys.client.catalog import Item, load_catalog
from bert_recsys.client.index import IndexSettings, IndexStore, ItemIndex, build_catalog_index
from bert_recsys.client.item_text import DEFAULT_TEMPLATE, TemplateUse, TextTemplate, template
from bert_recsys.client.recommend import Recommender, TasteIndex
from bert_recsys.client.triton import TritonClient
from bert_recsys.gateway.config import GatewaySettings

log = logs.get("gateway")


def rec_client(client: TritonClient) -> TritonClient | None:
    """A client of the recommendation encoder when `rec_embed` is served, else None."""
    rec_settings = replace(client.settings.for_family("rec"), server=client.settings.server)
    rec = TritonClient(client.url, protocol=client.protocol, settings=rec_settings)
    if rec.model_ready(rec_settings.models.embed):
        return rec
    rec.close()
    return None


def stored_index(store: IndexStore, client: TritonClient, items: list[Item], chosen: TextTemplate) -> ItemIndex:
    """The store's current index if the serving encoder made it from this template; else embedded again and
    published."""
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
        log.info("catalog index built through `%s`: %d items in %.1f s -> %s", client.settings.models.embed, len(index),
                 time.perf_counter() - started, store.root)
    return store.load(template=chosen.identity)


def load_recommender(config: GatewaySettings, client) -> Recommender:
    catalog = load_catalog(config.data_dir)
    items, interactions, errors = catalog.items, catalog.interactions, catalog.errors
    if errors:
        log.warning("%s: skipped %d malformed rows, first: %s", config.data_dir, len(errors), errors[0])
    chosen = template(DEFAULT_TEMPLATE)
    use = TemplateUse.of(chosen, items)
    log.info("item text %s: %d of %d items with a description, %d on title and categories only", use.template,
             use.with_description, use.items, use.fallback)
    store = IndexStore(config.index_store)
    index = stored_index(store, client, items, chosen)
    taste = None
    rec = rec_client(client)
    if rec is not None:
        taste = TasteIndex(stored_index(IndexStore(Path(config.index_store) / "rec"), rec, items, chosen), rec)
        log.info("interest vectors and the taste of new items from the recommendation encoder %s",
                 rec.settings.models.embed)
    recommender = Recommender(items, index, interactions, client, index_store=store, taste=taste)
    if recommender.histories:  # the similar-users matrix (a profile per user): built now, not by a request
        recommender.similar_users(next(iter(recommender.histories)), k=1)
    log.info("recommendations on: %d items, %d users, index %s", len(items), len(recommender.histories),
             store.current_name())
    return recommender
