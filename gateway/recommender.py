"""The gateway's Recommender: catalog and interactions from a MovieLens-format directory, the catalog index
from an IndexStore (embedded through Triton's `embed` on first start), following the store across rollouts."""
from __future__ import annotations

import time

import logs
from client.catalog import load_movielens
from client.index import IndexStore, build_catalog_index
from client.recommend import Recommender
from gateway.config import GatewaySettings

log = logs.get("gateway")


def load_recommender(config: GatewaySettings, client) -> Recommender:
    items, interactions, errors = load_movielens(config.data_dir)
    if errors:
        log.warning("%s: skipped %d malformed rows, first: %s", config.data_dir, len(errors), errors[0])
    store = IndexStore(config.index_store)
    serving = client.encoder_info()["export_manifest_sha256"]
    current = store.load() if store.current_name() is not None else None
    if current is not None and current.encoder.get("export_manifest_sha256") != serving:
        log.info("catalog index %s was embedded by another encoder than the one serving: embedding it again",
                 store.current_name())
        current = None
    if current is None:
        started = time.perf_counter()
        index = build_catalog_index(client, items)
        store.switch(store.publish(index))
        log.info("catalog index built through `embed`: %d items in %.1f s -> %s", len(index),
                 time.perf_counter() - started, config.index_store)
    recommender = Recommender(items, store.load(), interactions, client, index_store=store)
    if recommender.histories:  # the similar-users matrix (a profile per user): built now, not by a request
        recommender.similar_users(next(iter(recommender.histories)), k=1)
    log.info("recommendations on: %d items, %d users, index %s", len(items), len(recommender.histories),
             store.current_name())
    return recommender
