"""`ablate`: suite definitions, equal budgets, the report's layout, resuming and reusing runs."""
from __future__ import annotations

import json
import re

import pytest

from causalfusion import ablation
from causalfusion.ablation import SUITES, AblationSettings, get_suite, plan_config, run_suite, select_configs
from causalfusion.ablation_report import git_state, source_digest
from causalfusion.cli import main


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # shared with test_evaluation: the digits classifier is trained once per session
    path = tmp_path_factory.getbasetemp() / "causalfusion_eval_cache"
    path.mkdir(exist_ok=True)
    return path


def tiny(cache, **kw) -> AblationSettings:
    base = dict(steps=5, batch_size=8, depth=2, hidden_size=32, num_heads=4, eval_n=12, eval_steps=2, s_eval=(1, 2),
                ckpt_every=2, cache_dir=str(cache))
    return AblationSettings(**{**base, **kw})


def fid_table(report: str) -> list[list[str]]:
    section = report.split("## FID")[1].split("\n\n")[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.strip().splitlines()]


def test_suites_match_the_paper_tables():
    assert set(SUITES) == {"ar-steps", "decay", "order", "weight", "t-sampling"}
    assert [c.plan.get("fixed_steps") for c in SUITES["ar-steps"].configs] == [1, 2, 4, 8, "L", None]
    assert SUITES["ar-steps"].configs[-1].plan["gamma"] == 1.0
    assert [c.plan["gamma"] for c in SUITES["decay"].configs] == [1.0, 0.95, 0.9, 0.8]
    assert [c.plan["lam"] for c in SUITES["weight"].configs] == [1.0, 1.5, 2.0, 3.0]
    assert [c.plan["order"] for c in SUITES["order"].configs] == ["raster", "block", "dilated", "random"]
    t4 = SUITES["t-sampling"].configs[2]
    assert t4.plan["t_copies"] == 4 and t4.batch_div == 4 and SUITES["t-sampling"].configs[1].plan["t_per_step"]
    for suite in SUITES.values():
        for cfg in suite.configs:
            plan_config(cfg, 16).validate(16)  # every config is a valid plan on the 4x4 digits grid
            assert len(cfg.paper) == len(suite.paper_s_eval)
    assert plan_config(SUITES["ar-steps"].configs[4], 16).fixed_steps == 16
    with pytest.raises(ValueError, match="no config"):
        select_configs(get_suite("decay"), ["g0.5"])
    with pytest.raises(ValueError, match="unknown suite"):
        get_suite("nope")


def test_suite_report_layout_and_reuse(cache, tmp_path):
    logs = []
    report = run_suite("ar-steps", tiny(cache), tmp_path, ["s1", "random"], command="causalfusion ablate test",
                       log=logs.append)
    assert report == tmp_path / "ar-steps" / "report.md"
    text = report.read_text()
    table = fid_table(text)
    assert table[0] == ["training config", "S_eval=1", "S_eval=2"] and len(table) == 2 + 2
    assert [row[0] for row in table[2:]] == ["S_train = 1 (In-context DiT)", "random (uniform S, γ=1)"]
    assert all(re.fullmatch(r"\**\d+\.\d\d\**", v) for row in table[2:] for v in row[1:])
    assert "- command: `causalfusion ablate test`" in text and "- seed: 0" in text
    assert re.search(r"- commit: `[0-9a-f]{40}( \(dirty\))?`", text) and "5 training steps per config" in text
    assert "- compute: training" in text and "## The paper's numbers" in text and "13.78" in text
    assert "- training code: every config was trained by the source digest above" in text
    png = tmp_path / "ar-steps" / "ar-steps.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](ar-steps.png)" in text

    # equal budget: both runs trained 5 steps on batches of 8 from seed 0
    runs = json.loads((tmp_path / "ar-steps" / "runs.json").read_text())
    for run in runs.values():
        cfg = json.loads((tmp_path / "ar-steps" / ".." / "_runs" / run.split("/")[-1] / "config.json").read_text())
        assert (cfg["train"]["steps"], cfg["train"]["batch_size"], cfg["train"]["seed"]) == (5, 8, 0)

    # a second invocation reuses the finished runs and writes the same table; a run trained by other
    # code (here: one from before runs recorded their code) is named in the report
    logs.clear()
    res_path = tmp_path / "_runs" / runs["s1"].split("/")[-1] / "result.json"
    res = json.loads(res_path.read_text())
    assert res["code"]["source_digest"] == source_digest()
    del res["code"], res["code_history"]
    res_path.write_text(json.dumps(res))
    again = run_suite("ar-steps", tiny(cache), tmp_path, ["s1", "random"], command="x", log=logs.append)
    assert sum("reused" in m for m in logs) == 2 and fid_table(again.read_text()) == table
    assert f"`not recorded`: S_train = 1 (In-context DiT); `{source_digest()}`: random (uniform S, γ=1)" in again.read_text()

    # decay's γ=1 is the same configuration as ar-steps' "random": shared, not retrained
    logs.clear()
    decay = run_suite("decay", tiny(cache), tmp_path, ["g1.0"], log=logs.append)
    assert any("reused" in m for m in logs)
    assert [v.strip("*") for v in fid_table(decay.read_text())[2][1:]] == [v.strip("*") for v in table[3][1:]]

    # other S_eval: the trained weights are reused and only the missing S_eval is sampled; its row
    # equals the one a fresh run evaluating only that S_eval gets (from the in-memory EMA weights)
    logs.clear()
    more = run_suite("ar-steps", tiny(cache, s_eval=(2, 4)), tmp_path, ["s1"], log=logs.append)
    assert any("evaluating S_eval [4]" in m for m in logs) and not any("trained steps" in m for m in logs)
    more_row = [v.strip("*") for v in fid_table(more.read_text())[2][1:]]
    assert more_row[0] == table[2][2].strip("*")
    fresh = run_suite("ar-steps", tiny(cache, s_eval=(4,)), tmp_path / "fresh", ["s1"], log=logs.append)
    assert any("trained steps 0..5" in m for m in logs)
    assert fid_table(fresh.read_text())[2][1].strip("*") == more_row[1]


def test_interrupted_config_resumes_to_the_same_result(cache, tmp_path, monkeypatch):
    ref = run_suite("order", tiny(cache), tmp_path / "ref", ["raster"], log=lambda m: None)
    from causalfusion.trainer import Trainer

    real = Trainer.train_step

    def crash_at_3(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        run_suite("order", tiny(cache), tmp_path / "cut", ["raster"], log=lambda m: None)
    monkeypatch.setattr(Trainer, "train_step", real)
    import causalfusion.ablation_report as report_mod

    first = source_digest()
    monkeypatch.setattr(report_mod, "source_digest", lambda: "other-code")  # resumed by edited code
    resumed = run_suite("order", tiny(cache), tmp_path / "cut", ["raster"], log=lambda m: None)
    run = next(iter(json.loads((tmp_path / "cut" / "order" / "runs.json").read_text()).values()))
    res = json.loads(open(f"{run}/result.json").read())
    assert res["resumed_from"] == 2  # the checkpoint of step 2 (ckpt_every=2)
    assert fid_table(resumed.read_text()) == fid_table(ref.read_text())  # bit-identical resume
    # the run names the code that began it and the code that finished it, from the step it took over
    assert res["code"]["source_digest"] == first
    assert [(c["source_digest"], c["from_step"]) for c in res["code_history"]] == [(first, 0), ("other-code", 2)]
    assert f"`{first}+other-code`: raster" in resumed.read_text()


def test_budget_picks_equal_steps(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(ablation, "_time_steps", lambda st, cfg, ds, mc, n=3: 0.1)
    monkeypatch.setattr(ablation, "_time_eval", lambda st, cfg, mc, s_eval, n=50: 1.0)
    st = tiny(cache, steps=None, budget=100.0)
    from causalfusion.data import load_dataset

    ds = load_dataset("digits")
    calib = ablation.choose_steps(st, select_configs(get_suite("decay"), ["g1.0", "g0.8"]), ds,
                                  st.model_config(ds), (1, 2), log=lambda m: None)
    assert calib["steps"] == int((100 - 2 * 1.0 - 2 * 5.0) / 0.2)
    tiny_budget = tiny(cache, steps=None, budget=0.001)
    assert ablation.choose_steps(tiny_budget, get_suite("decay"), ds, st.model_config(ds), (1,),
                                 log=lambda m: None)["steps"] == 10  # floor


def test_ablate_cli_errors(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["ablate", "--suite", "nope", "--steps", "3"])
    with pytest.raises(SystemExit):  # neither --steps nor --budget
        main(["ablate", "--suite", "decay"])
    capsys.readouterr()
    assert main(["ablate", "--suite", "decay", "--steps", "3", "--configs", "g7", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config 'g7'" in err[0]
    assert main(["ablate", "--suite", "decay", "--steps", "3", "--eval-ar-steps", "1,32", "--out", str(tmp_path)]) == 2
    assert "exceeds" in capsys.readouterr().err


def test_git_state_and_digest(tmp_path):
    assert re.fullmatch(r"[0-9a-f]{40}( \(dirty\))?|unknown.*", git_state())
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    before = source_digest(tmp_path)
    assert len(before) == 16 and source_digest(tmp_path) == before
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")  # an edit changes the digest
    edited = source_digest(tmp_path)
    (tmp_path / "pkg" / "a.py").rename(tmp_path / "pkg" / "b.py")  # so does a rename
    assert len({before, edited, source_digest(tmp_path)}) == 3


def test_budget_choice_kept_on_resume(cache, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ablation, "choose_steps", lambda *a, **k: calls.append(1) or {"steps": 3})
    st = tiny(cache, steps=None, budget=50.0)
    run_suite("decay", st, tmp_path, ["g0.8"], command="first", log=lambda m: None)
    report = run_suite("decay", st, tmp_path, ["g0.8"], command="second", log=lambda m: None).read_text()
    assert len(calls) == 1 and "3 training steps per config (chosen from --budget 50 s" in report
    assert "invocations that trained these runs: `first`" in report and "- command: `second`" in report
    assert not re.search(r"\d{4}-\d\d-\d\dT", report)  # no dates in a report


def test_a_damaged_suite_file_is_one_line_naming_it(cache, tmp_path):
    out = tmp_path / "order"
    out.mkdir()
    (out / "suite.json").write_text('{"settings": ')  # cut off mid-write by an older version
    with pytest.raises(ValueError, match=r"suite.json is corrupt"):
        run_suite("order", tiny(cache), tmp_path, ["raster"], log=lambda m: None)
    from causalfusion.ablation import _read_code

    (tmp_path / "code.json").write_text('{"commit": "x"}')  # an object, not the list of invocations
    with pytest.raises(ValueError, match=r"code.json is corrupt \(not a list of objects\)"):
        _read_code(tmp_path)


def test_bold_marks_the_best_finite_value_in_its_direction():
    from causalfusion.ablation_report import metric_table

    def res(label: str, v: float) -> dict:
        return {"label": label, "rows": [{"ar_steps": 1, "fid": v, "accuracy": v}]}

    fid = metric_table([res("a", float("nan")), res("b", 3.0), res("c", 5.0)], (1,), "fid", ".2f", min)
    assert fid[2:] == ["| a | nan |", "| b | **3.00** |", "| c | 5.00 |"]  # lower FID is better
    acc = metric_table([res("a", 0.5), res("b", float("nan")), res("c", 0.9)], (1,), "accuracy", ".3f", max)
    assert acc[2:] == ["| a | 0.500 |", "| b | nan |", "| c | **0.900** |"]  # higher accuracy is better
