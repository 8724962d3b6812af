"""The text weights the gateway fuses with when a caller does not choose one.

Two weighted-cosine fusions have a default text weight ``w`` (score ``(1 - w) * photo + w *
text``): hybrid Search whose request leaves ``text_weight`` unset, and SimilarListings. Each is
resolved, in this order, from

1. the setting, when the operator set it: ``GATEWAY_SEARCH_TEXT_WEIGHT`` /
   ``GATEWAY_SIMILAR_TEXT_WEIGHT``;
2. the embedder's model info (GetModelInfo.fusion_weights): the weights chosen on the valid split
   for the image model it serves, read from its artefact's ``fusion_weights.json``. The embedder
   owns the artefact, so the weights always belong to the model that embeds the queries; the
   gateway re-reads them with the model info (GATEWAY_MODEL_INFO_TTL_S), so a new artefact brings
   its weights without a gateway restart;
3. the built-in default (0.5 and 0.7) when the embedder serves none (an artefact without text
   heads, or weights chosen for another image model, which the embedder refuses).

Which one is used, and where it came from, is logged when the gateway starts and whenever it
changes. If the embedder cannot be asked (down), the last weight resolved stays in use and the
embedder is not asked again for ``RETRY_AFTER_S`` (SimilarListings needs no embedder otherwise, so
an outage must not slow it down on every call).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.gateway.domain import ModelInfo, ServiceError

log = logging.getLogger(__name__)

SEARCH = "search"
SIMILAR = "similar"
#: Text weight of a hybrid Search whose request leaves text_weight unset, when neither the setting
#: nor the embedder's artefact gives one.
DEFAULT_SEARCH_TEXT_WEIGHT = 0.5
#: SimilarListings' text weight in the same case (issue #21's first measurement, test listings of
#: the earlier 3,453-photo split: same-category precision@10 photos 0.42, text 0.60, fused 0.62).
DEFAULT_SIMILAR_TEXT_WEIGHT = 0.7
BUILT_IN = {SEARCH: DEFAULT_SEARCH_TEXT_WEIGHT, SIMILAR: DEFAULT_SIMILAR_TEXT_WEIGHT}
SETTINGS = {SEARCH: "GATEWAY_SEARCH_TEXT_WEIGHT", SIMILAR: "GATEWAY_SIMILAR_TEXT_WEIGHT"}
WHAT = {SEARCH: "hybrid Search", SIMILAR: "SimilarListings"}
#: After the embedder could not be asked, how long the last resolved weights are used unasked.
RETRY_AFTER_S = 5.0


@dataclass(frozen=True)
class FusionWeight:
    """A resolved default text weight and where it came from (for the log)."""

    value: float
    source: str


class FusionDefaults:
    """Resolves the default text weight of each fusion (see the module docstring)."""

    def __init__(
        self,
        model_info: Callable[..., ModelInfo],
        *,
        search_override: float | None = None,
        similar_override: float | None = None,
    ) -> None:
        self._model_info = model_info
        #: The settings, None where unset (then the embedder's artefact decides).
        self.overrides: dict[str, float | None] = {SEARCH: search_override, SIMILAR: similar_override}
        self._current: dict[str, FusionWeight] = {}
        self._failed_at = -RETRY_AFTER_S
        self._lock = threading.Lock()

    def search_text_weight(self, deadline) -> float:
        return self.resolve(SEARCH, deadline).value

    def similar_text_weight(self, deadline) -> float:
        return self.resolve(SIMILAR, deadline).value

    def resolve(self, fusion: str, deadline) -> FusionWeight:
        override = self.overrides[fusion]
        if override is not None:
            choice = FusionWeight(float(override), f"the setting {SETTINGS[fusion]}={override:g}")
        else:
            with self._lock:
                current = self._current.get(fusion)
                resting = time.monotonic() - self._failed_at < RETRY_AFTER_S
            if current is not None and resting:
                return current
            try:
                info = self._model_info(deadline)
            except ServiceError as exc:  # the embedder is down: keep what we had
                with self._lock:
                    self._failed_at = time.monotonic()
                if current is not None:
                    return current
                choice = FusionWeight(
                    BUILT_IN[fusion],
                    f"the built-in default (the embedder could not be asked for its fusion weights: {exc})",
                )
            else:
                choice = from_model_info(fusion, info)
        with self._lock:
            changed = self._current.get(fusion) != choice
            self._current[fusion] = choice
        if changed:
            log.info("%s text weight %.2f, from %s", WHAT[fusion], choice.value, choice.source)
        return choice

    def describe_settings(self) -> str:
        """One line for the start-up log: the settings that override, the rest from the embedder."""
        parts = []
        for fusion in (SEARCH, SIMILAR):
            override = self.overrides[fusion]
            parts.append(
                f"{WHAT[fusion]} text weight "
                + (
                    f"{override:g} from {SETTINGS[fusion]}"
                    if override is not None
                    else f"from the embedder's artefact (GetModelInfo.fusion_weights; unset "
                    f"{SETTINGS[fusion]} to keep it so), built-in {BUILT_IN[fusion]:g} if it has none"
                )
            )
        return "; ".join(parts)


def from_model_info(fusion: str, info: ModelInfo) -> FusionWeight:
    """The weight the embedder's model info gives, or the built-in default and why not."""
    served = info.fusion_weights
    if served is None:
        reason = info.fusion_weights_problem or "it serves none"
        return FusionWeight(
            BUILT_IN[fusion],
            f"the built-in default (the embedder's image model "
            f"{info.model_version} has no fusion weights: {reason})",
        )
    value = served.search_text_weight if fusion == SEARCH else served.similar_text_weight
    return FusionWeight(
        float(value),
        f"the embedder's artefact ({served.source or 'fusion_weights.json'}, "
        f"chosen on the {served.chosen_on or 'valid'} split)",
    )
