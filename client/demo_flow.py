"""What `make demo` shows once Triton is up: a real recommendation for a MovieLens user, explained."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bert_recsys.contracts.protocol import Protocol
from bert_recsys.client.catalog import Item, load_catalog
from bert_recsys.client.index import IndexSettings, build_catalog_index
from bert_recsys.client.item_text import DEFAULT_TEMPLATE, TemplateUse, template
from bert_recsys.client.recommend import Recommender, TasteIndex
from bert_recsys.client.tokens import TokenCounter
from bert_recsys.client.triton import TritonClient

# Fictional new releases (no rating yet), added to the live index during the demo: item cold start.
NEW_RELEASES = (
    Item(9_000_001, "Starfall Rebellion (2026)", ("Action", "Adventure", "Sci-Fi"),
         "A smuggler and a disgraced starship captain lead a ragtag fleet against the empire that destroyed their "
         "home world, in a space opera of laser battles and galactic intrigue.", "The galaxy will burn."),
    Item(9_000_002, "The Paper Lantern Kingdom (2026)", ("Animation", "Children", "Fantasy"),
         "A shy girl follows a paper lantern into a hidden kingdom of talking animals and must find her courage to "
         "bring its lost king home, in a heartwarming animated adventure for the whole family."),
    Item(9_000_003, "Cold Ledger (2026)", ("Crime", "Thriller"),
         "A forensic accountant uncovers the money trail of a mob family and becomes the target of the hitmen, "
         "corrupt detectives and a ruthless boss who want the ledger back."),
    Item(9_000_004, "Second Draft (2026)", ("Comedy", "Romance"),
         "Two rival screenwriters forced to share an office fall for each other while rewriting a disastrous "
         "romantic comedy."),
    Item(9_000_005, "The Hollow Choir (2026)", ("Horror", "Mystery"),
         "A family moves into an abandoned church where a ghostly choir sings every night, and a demon waits."),
)


def run_demo(server_settings, protocol: str, data_dir: Path, user_id: int | None) -> None:
    from bert_recsys import settings

    if not (Path(data_dir) / "movies.csv").exists():
        raise SystemExit(f"demo: MovieLens data not found at {data_dir}; pass --data DIR (movies.csv, ratings.csv), "
                         "e.g. ml-latest-small from grouplens.org")
    url = server_settings.grpc_url if Protocol.parse(protocol) is Protocol.GRPC else server_settings.http_url
    with TritonClient(url, protocol=protocol, settings=replace(settings.SETTINGS, server=server_settings)) as client:
        info = client.encoder_info()
        print(f"[demo] serving encoder {info['export_variant']} (manifest {info['export_manifest_sha256'][:12]})")
        vector = client.embed(["A heartwarming animated adventure about toys that come alive."])
        print(f"[demo] embed: 1 text -> {vector.shape[1]}-dim vector, norm {np.linalg.norm(vector):.4f}")

        catalog = load_catalog(data_dir)
        items, interactions, errors = catalog.items, catalog.interactions, catalog.errors
        if errors:
            print(f"[demo] skipped {len(errors)} malformed rows, first: {errors[0]}")
        chosen = template(DEFAULT_TEMPLATE)
        use = TemplateUse.of(chosen, items)
        rec_client = recommendation_client(client, protocol, url)
        started = time.perf_counter()
        index = build_catalog_index(client, items, chosen, IndexSettings(centre=True))
        seconds = time.perf_counter() - started
        tokenizer = settings.MODEL_REPOSITORY_DIR / "tokenizer" / "1" / "tokenizer.json"
        tokens = TokenCounter(tokenizer).count(index.texts) if tokenizer.exists() else None
        print(f"[demo] item text {use.template}: {use.with_description} of {use.items} items with an overview, "
              f"{use.fallback} on title and genres only")
        print(f"[demo] embedded {len(items)} items through Triton's {client.settings.models.embed} "
              f"({index.encoder['export_variant']}) in {seconds:.1f} s"
              + (f" ({tokens} tokens, {tokens / seconds:.0f} tokens/s)" if tokens else "") + f", {index.kind} index")
        taste = None
        if rec_client is not None:
            started = time.perf_counter()
            taste = TasteIndex(build_catalog_index(rec_client, items, chosen, IndexSettings(centre=True)), rec_client)
            print(f"[demo] and through {rec_client.settings.models.embed} (the taste of users and new items) in "
                  f"{time.perf_counter() - started:.1f} s")
        recommender = Recommender(items, index, interactions, client, taste=taste)
        if user_id is None:  # a user with a long, recent history makes the most telling demo
            users, counts = np.unique(interactions.user, return_counts=True)
            user_id = int(users[np.argsort(-counts)][5])
        started = time.perf_counter()
        profile, recs = recommender.recommend(user_id, n=10)
        elapsed_ms = 1000 * (time.perf_counter() - started)
        print(f"\n[demo] profile: {profile.summary()}")
        recent = ", ".join(recommender.items[int(i)].title for i in profile.liked[-5:][::-1])
        print(f"[demo] recently liked: {recent}")
        print(f"[demo] top 10 for user {user_id} ({elapsed_ms:.0f} ms: recall, Triton scoring, assembly):")
        show(recs)
        new_items(recommender, user_id, interactions)
        if rec_client is not None:
            rec_client.close()
        similar = recommender.similar_users(user_id, k=3)
        print(f"[demo] similar users: {', '.join(f'{u} ({s:.2f})' for u, s in similar)}")
        _, cold = recommender.recommend(-1, n=3)
        print(f"[demo] cold start (unknown user): {', '.join(r['title'] for r in cold)}")


def show(recs: list[dict]) -> None:
    for rank, rec in enumerate(recs, 1):
        genres = "|".join(rec["categories"][:3])
        print(f"  {rank:>2}. {rec['title']:<55.55} {genres:<28.28} {rec['score']:.3f}  {rec['why']}")


def recommendation_client(client: TritonClient, protocol: str, url: str) -> TritonClient | None:
    """A client of the recommendation encoder (`rec_embed`) when the repository serves one (make finetune)."""
    rec_settings = replace(client.settings.for_family("rec"), server=client.settings.server)
    rec = TritonClient(url, protocol=protocol, settings=rec_settings)
    if rec.model_ready(rec_settings.models.embed):
        info = rec.encoder_info()
        print(f"[demo] the recommendation encoder {rec_settings.models.embed} is served beside "
              f"{client.settings.models.embed} ({info['export_variant']}, trained on split "
              f"{info.get('export_trained_split', '?')}): interest vectors and the taste of new items come from it")
        return rec
    rec.close()
    print(f"[demo] no {rec_settings.models.embed} served (make finetune builds one): the catalog index uses "
          f"{client.settings.models.embed}")
    return None


def new_items(recommender: Recommender, user_id: int, interactions) -> None:
    """Item cold start, live: new releases with no rating are embedded through Triton and added to the live index,
    then recommended to a user whose recent likes they resemble, with the reason."""
    started = time.perf_counter()
    for item in NEW_RELEASES:
        recommender.add_item(item)
    added_ms = 1000 * (time.perf_counter() - started)
    print(f"\n[demo] {len(NEW_RELEASES)} new releases, no ratings yet, embedded through Triton and added to the "
          f"live index in {added_ms:.0f} ms (no rebuild, no restart):")
    for item in NEW_RELEASES:
        print(f"  - {item.title}: {item.description[:80]}...")
    new_ids = {item.item_id for item in NEW_RELEASES}
    users, counts = np.unique(interactions.user, return_counts=True)
    candidates = [user_id] + [int(u) for u in users[np.argsort(-counts)][:40] if int(u) != user_id]
    for user in candidates:
        _, recs = recommender.recommend(user, n=10)
        placed = [(rank, r) for rank, r in enumerate(recs, 1) if r["item_id"] in new_ids]
        if placed:
            rank, rec = placed[0]
            print(f"[demo] user {user}'s top 10 now holds {rec['title']} at #{rank}: \"{rec['why']}\"")
            show(recs)
            return
    print("[demo] none of the new releases is close enough to the recent likes of the 40 most active users "
          f"(fresh_min_score {recommender.settings.fresh_min_score})")
