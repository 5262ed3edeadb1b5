"""A synthetic "ADNI-like" two-study dataset in the shape of the survey's experiment (§IX).

SYNTHETIC: no subject here is real. It mimics the survey's cohorts so the Table II protocol can
run without ADNI access; results on it say nothing about Alzheimer's disease.

- ADNI-1 (1.5T): 428 subjects, 199 AD / 229 NC; ADNI-2 (3T): 360 subjects, 159 AD / 201 NC.
- 90 features: mean gray-matter volume of the 90 cerebral AAL regions.
- Subject model, region r: v_r = base_r * (1 + a*z_head + b*(age - 73)/10 + c*eps_r - d_r*AD),
  with a shared head-size/global-atrophy factor z_head, independent region noise eps_r and an
  AD atrophy d_r concentrated where AD atrophy is reported (hippocampus, amygdala,
  parahippocampal gyrus, temporal lobe, posterior cingulate, precuneus, angular gyrus).
- Scanner shift: the 3T study multiplies every region by its own gain (about 1.06 +- 0.03),
  adds a global offset and has lower measurement noise, so the two sites differ in
  intensity distribution as real 1.5T/3T studies do.
"""

from __future__ import annotations

import numpy as np

from fedmi.core.rng import Stream, numpy_generator
from fedmi.data.federation import Federation, Site
from fedmi.data.registry import DATASETS, Dataset, DatasetOptions

AAL_REGIONS = [
    "Precentral", "Frontal_Sup", "Frontal_Sup_Orb", "Frontal_Mid", "Frontal_Mid_Orb",
    "Frontal_Inf_Oper", "Frontal_Inf_Tri", "Frontal_Inf_Orb", "Rolandic_Oper", "Supp_Motor_Area",
    "Olfactory", "Frontal_Sup_Medial", "Frontal_Med_Orb", "Rectus", "Insula", "Cingulum_Ant",
    "Cingulum_Mid", "Cingulum_Post", "Hippocampus", "ParaHippocampal", "Amygdala", "Calcarine",
    "Cuneus", "Lingual", "Occipital_Sup", "Occipital_Mid", "Occipital_Inf", "Fusiform",
    "Postcentral", "Parietal_Sup", "Parietal_Inf", "SupraMarginal", "Angular", "Precuneus",
    "Paracentral_Lobule", "Caudate", "Putamen", "Pallidum", "Thalamus", "Heschl", "Temporal_Sup",
    "Temporal_Pole_Sup", "Temporal_Mid", "Temporal_Pole_Mid", "Temporal_Inf",
]
FEATURES = [f"{r}_{side}" for r in AAL_REGIONS for side in ("L", "R")]
# Relative AD atrophy per region (fraction of volume lost); 0 elsewhere.
ATROPHY = {
    "Hippocampus": 0.10, "Amygdala": 0.09, "ParaHippocampal": 0.07, "Temporal_Inf": 0.05,
    "Temporal_Mid": 0.045, "Temporal_Pole_Mid": 0.04, "Temporal_Pole_Sup": 0.035, "Fusiform": 0.035,
    "Cingulum_Post": 0.04, "Precuneus": 0.03, "Angular": 0.03, "Parietal_Inf": 0.02, "Insula": 0.02,
}
STUDIES = {  # name -> (AD, NC, field strength)
    "ADNI-1 (synthetic)": (199, 229, 1.5),
    "ADNI-2 (synthetic)": (159, 201, 3.0),
}


def make_synthetic_adni(seed: int = 0) -> Federation:
    rng = numpy_generator(Stream.SIMULATION, seed)
    base = rng.uniform(0.35, 0.65, size=len(FEATURES))  # mean GM fraction per region
    atrophy = np.array([ATROPHY.get(f.rsplit("_", 1)[0], 0.0) for f in FEATURES])
    atrophy *= np.where(np.char.endswith(FEATURES, "_L"), 1.1, 0.9)  # left-lateralised
    sites = []
    for name, (n_ad, n_nc, tesla) in STUDIES.items():
        n = n_ad + n_nc
        y = np.r_[np.ones(n_ad, np.int64), np.zeros(n_nc, np.int64)]
        age = rng.normal(74.0, 6.5, n) + 1.0 * y
        z_head = rng.standard_normal((n, 1))
        region_noise = 0.09 if tesla < 2 else 0.075
        eps = rng.standard_normal((n, len(FEATURES)))
        # Disease severity varies between patients: some AD subjects look like controls.
        severity = np.clip(rng.normal(1.0, 0.45, (n, 1)), 0.0, None) * y[:, None]
        rel = 1 + 0.07 * z_head - 0.02 * (age[:, None] - 73) / 10 + region_noise * eps - atrophy * severity
        v = base * rel
        if tesla > 2:  # scanner shift of the 3T study
            v = v * rng.normal(1.06, 0.03, len(FEATURES)) + 0.01
        order = rng.permutation(n)
        sites.append(Site(name, v[order].astype(np.float32), y[order]))
    return Federation(
        name="synthetic-adni",
        sites=sites,
        kind="tabular",
        feature_names=FEATURES,
        synthetic=True,
        description="SYNTHETIC ADNI-like data (not real subjects): 2 studies, 90 AAL ROI gray-matter "
                    "volumes, AD vs NC, 1.5T/3T scanner shift",
        label_names=("NC", "AD"),
    )


@DATASETS.register()
class SyntheticAdni(Dataset):
    """SYNTHETIC two-study ADNI-like cohorts (the seed draws the subjects)."""

    name = "synthetic-adni"
    Options = DatasetOptions
    embedded = True

    def load(self, options: DatasetOptions, seed: int) -> Federation:
        return make_synthetic_adni(seed)
