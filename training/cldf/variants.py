"""The decoder variants a bundle may hold: CLDF and the ablations of the paper's Tables 2 and 3."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .bundle import Bundle


class Variant(NamedTuple):
    """A decoder variant: which network gives the features, which maps give the seeds, which CAM source."""

    features: str  # "cdm", "untrained" or "encoder"
    seeds: str  # "both", "cam" or "mg"
    cam: str | None = None  # a CAM method; None: the bundle's ``maps.cam_method``


VARIANTS: dict[str, Variant] = {
    "cdm": Variant("cdm", "both"),  # CLDF
    "untrained": Variant("untrained", "both"),  # CLDF on a randomly initialised CDM (Table 2)
    "cam-seeds": Variant("cdm", "cam", "layercam"),  # LayerCAM+CL (Table 3)
    "mg-seeds": Variant("cdm", "mg"),  # MG+CL (Table 3)
    "encoder": Variant("encoder", "both"),  # the noisy classifier's encoder features instead of the CDM's (Table 2)
    "ame-cam-seeds": Variant("cdm", "cam", "ame-cam"),  # AME-CAM+CL (Table 3)
    "ame-cam-fused": Variant("cdm", "both", "ame-cam"),  # AME-CAM+MG+CL (Table 3)
    "cpf-cte-seeds": Variant("cdm", "cam", "cpf-cte"),  # CPF-CTE+CL: seeds from the CPF-CTE map alone
}
#: CAM sources with a network of their own, and the `Bundle` field that holds it
OWN_NETWORKS = {"ame-cam": "ame_cam", "cpf-cte": "cpf_cte"}


def bundle_variants(bundle: Bundle) -> list[str]:
    """The decoder variants a bundle trains: AME-CAM's and CPF-CTE's need their networks, and none repeats CLDF's
    own recipe."""
    own = bundle.config.maps.cam_method
    cldf = VARIANTS["cdm"]._replace(cam=own)
    return [v for v, spec in VARIANTS.items()
            if (spec.cam not in OWN_NETWORKS or getattr(bundle, OWN_NETWORKS[spec.cam]) is not None)
            and (v == "cdm" or spec._replace(cam=spec.cam or own) != cldf)]
