import os

# Before FAISS loads OpenMP: idle OpenMP threads sleep instead of spinning on cores that the
# embedder and the other services share (the GNU OpenMP default spins after every search).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from services.indexer.server import main  # noqa: E402

main()
