"""Command line for the gateway's common calls, printing aligned tables.

    python -m services.gateway.cli --addr 127.0.0.1:50050 classify photo.jpg
    python -m services.gateway.cli search photo.jpg -k 5 --category "Home & Garden" --max-price 100
    python -m services.gateway.cli text "oak dining table" -k 5 --max-price 100
    python -m services.gateway.cli hybrid photo.jpg "oak dining table" --text-weight 0.3 --fusion rrf
    python -m services.gateway.cli recommend --like ID1 --like ID2 --skip ID3 --seen ID4 -k 5
    python -m services.gateway.cli similar LISTING_ID -k 5 --allow-partial-results
    python -m services.gateway.cli get LISTING_ID
    python -m services.gateway.cli add --title "Oak table" --price 40 --location "Leeds, West Yorkshire" a.jpg b.jpg
    python -m services.gateway.cli remove LISTING_ID

``--addr`` defaults to ``GATEWAY_ADDR`` or 127.0.0.1:50050; write calls send ``--token`` (default
``WRITE_TOKEN``). A failed call prints the status code and the gateway's message and exits 1.
Every search takes ``--allow-partial-results``: when every replica of an index shard is down, the
results of the other shards are printed with a line naming the missing shards (without it the
call fails with UNAVAILABLE naming the shard).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc

from services.gateway.client import GATEWAY_ADDR, GatewayClient
from services.gateway.domain import Listing, RankedListing, missing_shards_notice

#: The settings the CLI reads (its --addr flag overrides it).
CLI_SETTINGS = (GATEWAY_ADDR,)


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_price(listing: Listing) -> str:
    if listing.price is None:
        return "-"
    symbol = {"GBP": "£", "EUR": "€", "USD": "$"}.get(listing.currency)
    return f"{symbol}{listing.price:,.2f}" if symbol else f"{listing.price:,.2f} {listing.currency}".strip()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Rows aligned under headers; columns in ``right`` are right-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def results_table(results: Sequence[RankedListing]) -> str:
    """The results as a table, followed by the missing shards in words when there are any."""
    notice = missing_shards_notice(getattr(results, "missing_shards", ()))
    if not results:
        return "\n".join(filter(None, ["(no results)", notice]))
    rows = [
        [
            str(r.rank),
            f"{r.score:.3f}",
            _cut(r.listing.title, 40),
            _cut(r.listing.main_category, 24),
            format_price(r.listing),
            _cut(r.listing.location, 26),
            r.listing.id,
        ]
        for r in results
    ]
    return "\n".join(
        filter(
            None,
            [
                table(
                    ["rank", "score", "title", "main category", "price", "location", "listing id"],
                    rows,
                    right=(0, 1, 4),
                ),
                notice,
            ],
        )
    )


def listing_table(listing: Listing) -> str:
    fields = [
        ("id", listing.id),
        ("title", listing.title),
        ("main category", listing.main_category),
        ("category", listing.category),
        ("price", format_price(listing)),
        ("location", listing.location),
        ("images", ", ".join(listing.image_ids) or "-"),
        ("description", _cut(listing.description, 200) or "-"),
    ]
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in fields)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-k", type=int, default=10, help="results (default 10)")
    parser.add_argument("--category", default="", help="only this main category")
    parser.add_argument("--min-price", type=float)
    parser.add_argument("--max-price", type=float)
    parser.add_argument("--location", default="", help='exact location, e.g. "Leeds, West Yorkshire"')
    parser.add_argument("--exclude", action="append", default=[], metavar="LISTING_ID")
    parser.add_argument(
        "--allow-partial-results",
        action="store_true",
        help="when every replica of an index shard is down, show the other "
        "shards' results and name the missing shards (default: fail)",
    )


def _filters(args) -> dict:
    return dict(
        main_category=args.category,
        min_price=args.min_price,
        max_price=args.max_price,
        location=args.location,
        exclude=args.exclude,
        allow_partial_results=args.allow_partial_results,
    )


#: --fusion choices of `hybrid` -> the client's fusion names.
FUSION_CHOICES = {
    "cosine": "weighted_cosine",
    "weighted_cosine": "weighted_cosine",
    "rrf": "reciprocal_rank",
    "reciprocal_rank": "reciprocal_rank",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway.cli", description="call the marketplace gateway"
    )
    parser.add_argument(
        "--addr",
        GATEWAY_ADDR.flag,
        dest="addr",
        default=GATEWAY_ADDR.from_environment(),
        help=f"the gateway (default env {GATEWAY_ADDR.env} or {GATEWAY_ADDR.default})",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    parser.add_argument("--token", default=None, help="write token (default $WRITE_TOKEN)")
    commands = parser.add_subparsers(dest="command", required=True)

    classify = commands.add_parser("classify", help="main category of a photo")
    classify.add_argument("photo")
    classify.add_argument("--top-k", type=int, default=3)

    search = commands.add_parser("search", help="listings that look like a photo")
    search.add_argument("photo")
    _add_filters(search)

    text = commands.add_parser("text", help="listings whose text matches a query")
    text.add_argument("query")
    _add_filters(text)

    hybrid = commands.add_parser("hybrid", help="listings ranked by a photo and a text query")
    hybrid.add_argument("photo")
    hybrid.add_argument("query")
    hybrid.add_argument(
        "--text-weight",
        type=float,
        default=None,
        help="weight of the text ranking in [0, 1] (default: the gateway's, chosen on valid "
        "for the served image model)",
    )
    hybrid.add_argument(
        "--fusion",
        choices=sorted(FUSION_CHOICES),
        default="cosine",
        help="cosine: (1-w)*image + w*text cosine (default); rrf: reciprocal-rank fusion",
    )
    _add_filters(hybrid)

    recommend = commands.add_parser("recommend", help="listings like the liked ones")
    recommend.add_argument(
        "--like",
        action="append",
        default=[],
        metavar="LISTING_ID",
        required=True,
        help="a liked listing (repeat for more)",
    )
    recommend.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="LISTING_ID",
        help="a skipped listing: move away from it, never return it",
    )
    recommend.add_argument(
        "--seen",
        action="append",
        default=[],
        metavar="LISTING_ID",
        help="an already seen listing: never return it",
    )
    _add_filters(recommend)

    similar = commands.add_parser("similar", help="listings that look like a listing")
    similar.add_argument("listing_id")
    similar.add_argument(
        "--photos-only", action="store_true", help="rank by the listing's photos alone, not its text"
    )
    _add_filters(similar)

    get = commands.add_parser("get", help="one listing")
    get.add_argument("listing_id")
    get.add_argument(
        "--include-pending", action="store_true", help="also a listing whose vectors are not searchable yet"
    )

    add = commands.add_parser("add", help="add a listing with its photos")
    add.add_argument("photos", nargs="+")
    add.add_argument("--title", required=True)
    add.add_argument("--description", default="")
    add.add_argument("--category", default="", help="full category path")
    add.add_argument("--main-category", default="", help="empty: predicted from the photos")
    add.add_argument("--price", type=float)
    add.add_argument("--currency", default="")
    add.add_argument("--location", default="")
    add.add_argument("--id", default="", help="listing id (default: assigned)")

    remove = commands.add_parser("remove", help="remove a listing and its vectors")
    remove.add_argument("listing_id")
    return parser


def run(args, client: GatewayClient) -> str:
    if args.command == "classify":
        result = client.classify(args.photo, args.top_k)
        rows = [[c.category, f"{c.probability:.3f}"] for c in result.categories]
        return table(["category", "probability"], rows, right=(1,)) + f"\nmodel {result.model_version}"
    if args.command == "search":
        return results_table(client.search_by_image(args.photo, args.k, **_filters(args)))
    if args.command == "text":
        return results_table(client.search_by_text(args.query, args.k, **_filters(args)))
    if args.command == "hybrid":
        return results_table(
            client.search(
                args.photo,
                args.query,
                args.k,
                text_weight=args.text_weight,
                fusion=FUSION_CHOICES[args.fusion],
                **_filters(args),
            )
        )
    if args.command == "recommend":
        return results_table(client.recommend(args.like, args.skip, args.seen, args.k, **_filters(args)))
    if args.command == "similar":
        return results_table(
            client.similar(args.listing_id, args.k, photos_only=args.photos_only, **_filters(args))
        )
    if args.command == "get":
        return listing_table(client.get(args.listing_id, include_pending=args.include_pending))
    if args.command == "add":
        added = client.add_listing(
            args.photos,
            title=args.title,
            description=args.description,
            category=args.category,
            main_category=args.main_category,
            price=args.price,
            currency=args.currency,
            location=args.location,
            listing_id=args.id,
        )
        note = " (pending: stored; searchable once its shard has taken the vectors)" if added.pending else ""
        return f"added{note}\n" + listing_table(added.listing)
    if args.command == "remove":
        removed = client.remove(args.listing_id)
        note = "; vector deletion pending" if removed.pending else ""
        return f"removed listing {removed.listing_id} ({removed.images_removed} image vectors{note})"
    raise ValueError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with GatewayClient(args.addr, timeout=args.timeout, write_token=args.token) as client:
        try:
            print(run(args, client))
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        except OSError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
