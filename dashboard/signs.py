"""Which way is good for each number the pages show, so a change gets the same arrow and colour everywhere.

``st.metric`` draws the arrow from the sign of its ``delta`` text and colours it by ``delta_color``: "normal" paints
a rise green, "inverse" paints a rise red. A rise of BA or RA is good; a rise of ASR, of the trigger-attention share
(Grad-CAM: a repaired model should look at the trigger less) or of the poisoned-cluster separation is bad. UI only:
the numbers come from ``analysis`` and ``suspects.metrics``.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["HIGHER_IS_BETTER", "delta_color", "delta_points"]

#: per quantity: whether a higher value is the better one
HIGHER_IS_BETTER: dict[str, bool] = {
    "ba": True,
    "ra": True,
    "der": True,
    "asr": False,
    "trigger_share": False,  # Grad-CAM's share of the map on the trigger's pixels: lower = less drawn to it
    "map_shift": False,  # how far the Grad-CAM map moves when the trigger is added
    "separation": False,  # how tightly triggered points cluster apart from their classes
}


def delta_color(quantity: str) -> Literal["normal", "inverse"]:
    """``st.metric``'s ``delta_color`` for a change of ``quantity`` (a key of :data:`HIGHER_IS_BETTER`)."""
    return "normal" if HIGHER_IS_BETTER[quantity] else "inverse"


def delta_points(before: float, after: float, suffix: str = "") -> str:
    """The change ``after - before`` of a fraction in percentage points with its sign, e.g. ``-73.0 pts``: the
    arrow then points the way the number moved."""
    change = round(100 * (float(after) - float(before)), 1) + 0.0  # + 0.0: no "-0.0" (a down arrow for no change)
    return f"{change:+.1f} pts" + (f" {suffix}" if suffix else "")
