"""The paper's numbers and claims as data (source: /work/shared/paper_facts.md, section 4).

*On the Geometry of On-Policy Distillation* (arXiv 2606.07082) reports, for a Qwen3-8B student
(Qwen3-32B teacher, dapo-math-17k): SFT measured base -> SFT anchor, OPD and RLVR measured
anchor -> endpoint. Fractions are stored as fractions (0.516, not 51.6). The study's report puts
each value next to ours; `verdicts.py` computes the verdicts from `CLAIMS` (never hand-written).
"""

from __future__ import annotations

import dataclasses

METHODS = ("sft", "opd", "rlvr")

# Table 1 and the endpoint-geometry table (numbers where the paper gives numbers).
TABLE1_SPARSITY = {"sft": 0.081, "opd": 0.516, "rlvr": 0.772}
UPDATE_DENSITY = {"sft": 0.9273, "opd": 0.4628, "rlvr": 0.2776}
LOW_MAG_OVERLAP = {"sft": 0.3188, "opd": 0.5359, "rlvr": 0.7348}
# Qualitative / order-of-magnitude entries, as the paper states them.
MAX_ANGLE_TEXT = {"sft": "> 10 deg", "opd": "~1 deg", "rlvr": "< 0.5 deg"}
NSS_TEXT = {"sft": "~1e-3", "opd": "~1e-4", "rlvr": "~1e-5"}
PRINCIPAL_OVERLAP_TEXT = {"sft": "highest", "opd": "below baseline", "rlvr": "lowest"}
STABLE_RANK_TEXT = {"sft": "expands", "opd": "narrow band", "rlvr": "contracts"}
SIM16_TEXT = {"sft": "converges gradually", "opd": "high from the first checkpoint",
              "rlvr": "converges gradually"}

# Ranges quoted for other pairs.
OPD_VARIANT_SPARSITY = (0.486, 0.571)   # OPD variants (sizes, MoE teacher, code data)
PUBLISHED_SPARSITY = {"sft": (0.006, 0.188), "rlvr": (0.36, 0.92)}  # Path Not Taken, Table 1
MASK_BASELINE_ALPHA = 0.5                # the appendix's alpha (main text quotes a 30% baseline)

# Section 4 settings (the qwen3_8b preset mirrors them; smaller presets keep the ratios).
SETTINGS = {
    "opd": dict(lr=1e-6, schedule="constant", b1=0.9, b2=0.98, weight_decay=0.1,
                samples_per_prompt=8, temperature=1.0, global_batch=64, steps=299,
                snapshots=(63, 127, 191, 255, 299)),
    "rlvr": dict(lr=1e-6, schedule="constant", b1=0.9, b2=0.98, eps=1e-15, global_batch=512,
                 steps=1023, clip_low=0.2, clip_high=0.28),
    "sft": dict(lr=1e-5, schedule="cosine", final_lr=1e-6, warmup=0.1, b1=0.9, b2=0.95,
                weight_decay=0.1, global_batch=256, epochs=5),
}


@dataclasses.dataclass(frozen=True)
class Claim:
  """A statement of the paper that the study tests.

  Attributes:
    id: key of the verdict function in `verdicts.VERDICTS`.
    section: the report section it is printed in.
    text: the claim, as the report states it.
    paper: the paper's number(s) or wording.
  """

  id: str
  section: str
  text: str
  paper: str


def _pct(d):
  return ", ".join(f"{m.upper()} {100 * v:.1f}%" for m, v in d.items())


CLAIMS: tuple[Claim, ...] = (
    Claim("sparsity_order", "table1", "bf16 update sparsity ordering SFT < OPD < RLVR",
          _pct(TABLE1_SPARSITY)),
    Claim("opd_sparsity_band", "table1",
          "OPD sparsity inside the paper's OPD band 48.6-57.1%", "48.6-57.1% over OPD variants"),
    Claim("sft_sparsity_band", "table1",
          "SFT sparsity inside the published SFT range 0.6-18.8%", "0.6-18.8% (Path Not Taken)"),
    Claim("rlvr_sparsity_band", "table1",
          "RLVR sparsity inside the published RL range 36-92%", "36-92% (Path Not Taken)"),
    Claim("density_order", "endpoint", "update density ordering SFT > OPD > RLVR",
          _pct(UPDATE_DENSITY)),
    Claim("angle_order", "endpoint",
          "max principal angle (representative matrix) ordering SFT > OPD > RLVR",
          ", ".join(f"{m.upper()} {t}" for m, t in MAX_ANGLE_TEXT.items())),
    Claim("nss_order", "endpoint", "normalized spectral shift ordering SFT > OPD > RLVR",
          ", ".join(f"{m.upper()} {t}" for m, t in NSS_TEXT.items())),
    Claim("lowmag_order", "endpoint", "low-magnitude-mask overlap ordering SFT < OPD < RLVR",
          _pct(LOW_MAG_OVERLAP)),
    Claim("principal_overlap", "endpoint",
          "principal-mask overlap: SFT highest, RLVR lowest, OPD below the random baseline",
          "SFT highest, OPD below baseline, RLVR lowest"),
    Claim("stable_rank_shapes", "trajectory",
          "stable rank of dW_t: SFT expands, RLVR contracts, OPD stays in the narrowest band",
          "SFT expands, OPD narrow band, RLVR contracts"),
    Claim("sim16_early", "trajectory",
          "Sim_16(first checkpoint, end) highest for OPD (OPD's subspace is set early)",
          "OPD high from the first checkpoint; SFT and RLVR converge gradually"),
    Claim("rank16_opd_keeps", "rank16",
          "OPD keeps its accuracy under rank-16 projection (within noise)",
          "OPD keeps its accuracy"),
    Claim("rank16_sft_loses", "rank16",
          "SFT loses accuracy under rank-16 projection (beyond noise)", "SFT loses accuracy"),
    Claim("sparsify_unchanged", "controls",
          "token sparsification leaves the stable-rank trajectory OPD-like (nearest reference "
          "trajectory is OPD's, for every sparsification run)",
          "stable-rank trajectory unchanged"),
    Claim("offpolicy_matches", "controls",
          "off-policy (teacher) rollouts: stable-rank trajectory nearest to OPD's",
          "stable rank matches on-policy OPD"),
    Claim("offpolicy_norm", "controls",
          "off-policy (teacher) rollouts: final update Frobenius norm larger than OPD's",
          "update norm modestly larger"),
    Claim("mixing_opd_dominant", "controls",
          "OPD+RLVR mixing, alpha >= 0.5: stable-rank trajectory nearest to OPD's",
          "OPD-dominant mixtures keep the OPD trajectory"),
    Claim("mixing_small_alpha", "controls",
          "OPD+RLVR mixing, smallest alpha: trajectory leaves OPD's (nearer to RLVR's)",
          "small alpha leaves it"),
    Claim("opd_improves", "accuracy", "OPD raises the student's accuracy above the anchor's",
          "(study acceptance)"),
    Claim("rlvr_improves", "accuracy", "RLVR raises the student's accuracy above the anchor's",
          "(study acceptance)"),
)

CLAIM_IDS = tuple(c.id for c in CLAIMS)
