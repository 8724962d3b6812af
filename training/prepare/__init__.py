"""Turn the raw marketplace tables and photos into a reproducible, leak-free dataset.

    python -m training.prepare --data DIR --out DIR

Steps (each reports what it dropped and why, nothing is dropped silently):

1. Listings: ``Products.csv`` read with ``lineterminator="\\n"`` (descriptions hold
   bare carriage returns that the default reader treats as row ends, which is where
   the course's phantom "nulls" came from); incomplete rows and duplicate ids
   dropped; prices parsed to number + currency and flagged; the Gumtree title
   suffix split into title and location; ``main_category`` derived from the path.
2. Join: ``Images.csv`` inner-joined with the listings and restricted to images whose
   file exists (``<image_id>.jpg`` or ``<image_id>_resized.jpg``).
3. Photos: decoded with `common.images.open_image` (EXIF orientation, any mode to RGB,
   corrupt files listed and skipped), letterboxed to a square of their own longest
   side, at most 512 (never scaled up: the 320x320 photos stay 320x320, the model's
   transform resizes to its input size) and written as ``OUT/images/<image_id>.jpg``
   on 2 processes; a re-run skips finished files.
   A source that is already a square RGB JPEG without EXIF and correctly centred is
   copied byte for byte (re-encoding would only lose quality); anything else is
   re-encoded at quality 95, which also drops EXIF metadata such as GPS positions.
   The course's square photos were letterboxed *top-left* (the black band is only
   on the right or bottom); `recentre_letterbox` moves their content to the centre
   so training photos look like what `common.images.letterbox` gives at query time.
   Each cleaned photo gets a 32x32 grey fingerprint for near-duplicate detection.
4. Splits: 70/15/15 train/valid/test, grouped so that a listing never spans two
   splits *and* listings sharing a photo or a near-duplicate of one (the same photo
   re-encoded or resized, see `near_duplicate_photo_pairs`) or a near-identical text
   (re-posted adverts, `near_duplicate_text_pairs`) form one unit, stratified by main
   category, with a fixed seed.
5. ``labels.json``, ``listings.csv``, ``images.csv``, ``summary.json`` and
   ``samples.png`` (a grid of sample photos per category).

The output layout is declared in `common.prepared_data`, which is also its reader and writer.\n\nModules, one per step: `tables` (1, 2), `photos` (3), `near_duplicates` and `splits` (4),\n`report` (5), `pipeline` (all of them in order) and `cli` (the command line).
"""

from training.prepare.cli import main
from training.prepare.pipeline import prepare
from training.prepare.report import format_summary

__all__ = ["format_summary", "main", "prepare"]
