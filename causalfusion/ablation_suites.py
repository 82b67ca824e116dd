"""The ablation suites: the paper's Tab. 2, 3a, 3b, 3c and 7 as configurations to train and compare
(``causalfusion.ablation`` runs them), each row with the paper's FID-10k for its S_eval."""
from __future__ import annotations

from dataclasses import dataclass, replace

L = "L"  # stands for the number of tokens of the data (16 for digits)


@dataclass(frozen=True)
class AblationConfig:
    name: str  # directory name
    label: str  # row of the table
    plan: dict  # ARPlanConfig fields (fixed_steps may be L)
    batch_div: int = 1  # Tab. 7: K t-copies per image with batch / K
    paper: tuple = ()  # the paper's FID-10k for S_eval = suite.s_eval (ImageNet 256, L/2 model)


@dataclass(frozen=True)
class Suite:
    name: str
    table: str
    title: str
    configs: tuple
    s_eval: tuple = (1, 2, 4, 8)
    paper_s_eval: tuple = (1, 2, 4, 8)
    note: str = ""


_BASE = dict(gamma=0.9, lam=1.0, order="random")  # Tab. 3a/3b baseline: no AR loss weighting yet
SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("ar-steps", "Tab. 2", "AR steps: fixed S_train vs uniformly random S", (
        AblationConfig("s1", "S_train = 1 (In-context DiT)", dict(_BASE, fixed_steps=1), paper=(13.78, 356.69, 404.67, 390.18)),
        AblationConfig("s2", "S_train = 2", dict(_BASE, fixed_steps=2), paper=(16.69, 14.77, 47.49, 136.04)),
        AblationConfig("s4", "S_train = 4", dict(_BASE, fixed_steps=4), paper=(24.14, 15.37, 18.13, 33.14)),
        AblationConfig("s8", "S_train = 8", dict(_BASE, fixed_steps=8), paper=(54.08, 24.49, 22.66, 20.01)),
        AblationConfig("sL", "S_train = L (pure AR)", dict(_BASE, fixed_steps=L), paper=(313.28, 321.62, 261.26, 192.25)),
        AblationConfig("random", "random (uniform S, γ=1)", dict(_BASE, gamma=1.0), paper=(21.31, 22.17, 23.54, 25.05)),
    ), note="λ=1 and random order (Sec. 4 precedes the AR loss weighting). The paper's S_train = L row is S_train = 256."),
    Suite("decay", "Tab. 3a", "Exponential decay γ of the AR-step distribution", (
        AblationConfig("g1.0", "γ = 1.0", dict(_BASE, gamma=1.0), paper=(21.31, 22.17, 23.54, 25.05)),
        AblationConfig("g0.95", "γ = 0.95", dict(_BASE, gamma=0.95), paper=(14.49, 17.78, 19.79, 23.93)),
        AblationConfig("g0.9", "γ = 0.9", dict(_BASE, gamma=0.9), paper=(12.89, 15.57, 18.83, 22.72)),
        AblationConfig("g0.8", "γ = 0.8", dict(_BASE, gamma=0.8), paper=(12.78, 15.42, 19.38, 23.78)),
    ), note="λ=1, random order. The paper's γ=0.9 / S_eval=8 entry reads '2.72' in the extracted text; 22.72 is assumed."),
    Suite("order", "Tab. 3b", "Token order (training order = inference order)", (
        AblationConfig("raster", "raster order", dict(_BASE, order="raster"), paper=(14.46,)),
        AblationConfig("block2", "block-wise raster (2x2)", dict(_BASE, order="block", block=2), paper=(14.62,)),
        AblationConfig("dilated", "dilated order (stride 2)", dict(_BASE, order="dilated", dilation=2), paper=(15.54,)),
        AblationConfig("random", "random order", dict(_BASE), paper=(12.89,)),
    ), paper_s_eval=(1,), note="γ=0.9, λ=1; each model samples in its training order. The digits grid is 4x4 tokens, so the paper's 4x4/8x8 blocks (of a "
                                 "16x16 grid) become 2x2 blocks; the paper's block row here is its 4x4 one."),
    Suite("weight", "Tab. 3c", "AR loss weight λ (first step, falling to 1)", (
        AblationConfig("lam1", "λ = 1", dict(_BASE, lam=1.0), paper=(12.89, 15.57, 18.83)),
        AblationConfig("lam1.5", "λ = 1.5", dict(_BASE, lam=1.5), paper=(12.61, 15.49, 18.32)),
        AblationConfig("lam2", "λ = 2", dict(_BASE, lam=2.0), paper=(12.13, 15.15, 18.09)),
        AblationConfig("lam3", "λ = 3", dict(_BASE, lam=3.0), paper=(12.50, 15.28, 17.92)),
    ), s_eval=(1, 2, 4), paper_s_eval=(1, 2, 4), note="γ=0.9, random order, release weighting."),
    Suite("t-sampling", "Tab. 7", "Diffusion timestep sampling across AR steps", (
        AblationConfig("shared", "shared t for all AR steps", dict(_BASE, lam=2.0), paper=(12.13,)),
        AblationConfig("per-step", "random t per AR step", dict(_BASE, lam=2.0, t_per_step=True), paper=(12.27,)),
        AblationConfig("t4", "4x t per AR step (batch / 4)", dict(_BASE, lam=2.0, t_copies=4), batch_div=4, paper=(12.19,)),
    ), s_eval=(1,), paper_s_eval=(1,), note="γ=0.9, λ=2, random order (the paper's final defaults)."),
)}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    return SUITES[name]


def select_configs(suite: Suite, names: list[str] | None) -> Suite:
    """The suite restricted to ``names`` (in the suite's order); all configs when None."""
    if not names:
        return suite
    known = {c.name for c in suite.configs}
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"suite {suite.name} has no config {bad[0]!r}; its configs: {', '.join(sorted(known))}")
    return replace(suite, configs=tuple(c for c in suite.configs if c.name in names))
