"""More bad input on the command line (an adversarial audit): each case is one line on stderr,
exit code 2, and no file created or changed (listing, sizes and mtimes compared)."""
from __future__ import annotations

import pytest

from causalfusion.cli import main
from conftest import one_error_line

TINY = ["--depth", "1", "--hidden-size", "32", "--num-heads", "4", "--batch-size", "4",
        "--sample-every", "0", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--data", "digits", "--out", str(out), "--steps", "1", *TINY]) == 0
    return out


def snapshot(root) -> dict:
    """Every path under ``root`` with its size, mtime and content hash: what a refused command must
    leave alone."""
    import hashlib

    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in root.rglob("*")}


def refused(argv: list[str], needle: str, root, capsys) -> None:
    """``argv`` exits 2 with one error line containing ``needle`` and touches nothing under ``root``."""
    before = snapshot(root)
    assert main(argv) == 2
    assert needle in one_error_line(capsys)
    assert snapshot(root) == before


@pytest.mark.parametrize("argv", [
    ["edit", "--ckpt", "{run}", "--generate-class", "3", "--class", "8", "--n", "1", "--sample-steps", "1", "--out", "{tmp}/e.png"],
    ["eval", "--ckpt", "{run}", "--n", "2", "--sample-steps", "1"],
    ["eval", "--npz", "{tmp}/s.npz"],
    ["probe", "--ckpt", "{run}"],
])
def test_an_unknown_device_is_one_line(argv, run_dir, tmp_path, capsys):
    """edit, eval and probe took --device to torch unchecked: a RuntimeError (or, for cuda on a
    machine without it, an AssertionError) traceback."""
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv] + ["--device", "tpu"]
    refused(argv, "unknown device 'tpu'", tmp_path, capsys)


@pytest.mark.parametrize("argv", [
    ["train", "--data", "digits", "--steps", "1", *TINY],
    ["train-mm", "--data", "shapes:train:8", "--steps", "1", "--max-text-len", "24", *TINY[:8], "--no-progress"],
    ["sample", "--ckpt", "{run}", "--n", "1", "--sample-steps", "1"],
    ["sample", "--ckpt", "{run}", "--n", "1", "--sample-steps", "1", "--out", "{tmp}/x.png", "--npz"],
    ["edit", "--ckpt", "{run}", "--generate-class", "3", "--class", "8", "--n", "1", "--sample-steps", "1"],
])
def test_an_empty_output_path_is_refused_before_any_work(argv, run_dir, tmp_path, monkeypatch, capsys):
    """--out '' trained into the current directory (Path('') is '.'); sample and edit did all the
    sampling and then failed with "PosixPath('.') has an empty name"."""
    monkeypatch.chdir(tmp_path)
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    refused(argv + ([""] if argv[-1] == "--npz" else ["--out", ""]), "empty", tmp_path, capsys)


MM_TINY = ["--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--max-text-len", "24", "--batch-size", "4",
           "--no-progress"]


@pytest.mark.parametrize("argv, needle", [
    # NaN passed `lam < 1`: the first loss was NaN after config.json and log.csv were written
    (["train", "--data", "digits", "--steps", "1", "--lam", "nan", *TINY], "lambda must be a finite number >= 1"),
    (["train-mm", "--data", "shapes:train:8", "--steps", "1", "--lam", "nan", *MM_TINY], "lambda must be a finite"),
    (["train-mm", "--data", "shapes:train:8", "--steps", "1", "--text-weight", "nan", *MM_TINY], "text loss weight"),
    # NaN passed `budget <= 0`: "cannot convert float NaN to integer" after OUT/order was made
    (["ablate", "--suite", "order", "--budget", "nan"], "--budget must be > 0"),
    # the multimodal suite checked none of these: a negative budget trained 10 steps per run and exited 0,
    # --steps 0 failed at loading an untrained run, --eval-n 0 only after training every run
    (["ablate", "--suite", "multimodal", "--budget", "-1"], "--budget must be > 0"),
    (["ablate", "--suite", "multimodal", "--budget", "nan"], "--budget must be > 0"),
    (["ablate", "--suite", "multimodal", "--steps", "0"], "--steps must be >= 1"),
    (["ablate", "--suite", "multimodal", "--steps", "1", "--eval-n", "0"], "--eval-n must be >= 2"),
])
def test_nan_and_out_of_range_numbers_are_refused_before_any_write(argv, needle, tmp_path, capsys):
    refused(argv + ["--out", str(tmp_path / "out")], needle, tmp_path, capsys)


@pytest.mark.parametrize("argv", [
    ["eval", "--ckpt", "{run}", "--n", "2", "--sample-steps", "1", "--ar-steps", ","],  # printed nothing, exit 0
    ["train", "--data", "digits", "--out", "{tmp}/r", "--steps", "1", "--eval-every", "1", "--eval-ar-steps", "", *TINY],
])
def test_an_empty_list_of_ar_steps_is_refused(argv, run_dir, tmp_path, capsys):
    refused([a.format(run=run_dir, tmp=tmp_path) for a in argv], "give at least one number of AR steps", tmp_path, capsys)


# --lr 1e30: step 0's loss is finite (taken before any update), step 1's is inf, before the first checkpoint
DIVERGING = {
    "train": ["train", "--data", "digits", "--steps", "2", "--lr", "1e30", *TINY],
    "train-mm": ["train-mm", "--data", "shapes:train:8", "--steps", "2", "--lr", "1e30", *MM_TINY],
}


@pytest.mark.parametrize("command", DIVERGING)
def test_a_fresh_run_that_diverges_before_its_first_checkpoint_leaves_nothing(command, tmp_path, capsys):
    """The run exited with one line but left config.json and log.csv (train-mm: tokenizer.json) in a
    directory that could neither be resumed nor trained into without them looking like a run."""
    refused(DIVERGING[command] + ["--out", str(tmp_path / "new" / "run")], "loss is inf at step 1", tmp_path, capsys)
    assert not (tmp_path / "new").exists()  # the directories it created went too


def test_a_diverging_run_in_an_existing_directory_keeps_what_was_there(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "samples").mkdir()  # a folder that was there: kept whole (only new top-level entries go)
    argv = DIVERGING["train"] + ["--sample-every", "1", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "loss is inf at step 1" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "samples"]  # config.json, log.csv went
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_resumed_run_that_diverges_deletes_nothing(run_dir, tmp_path, capsys):
    import shutil

    run = shutil.copytree(run_dir, tmp_path / "run")  # at step 1: the first step it trains diverges
    refused(["train", "--out", str(run), "--resume", "--steps", "3", "--lr", "1e30", "--no-progress"],
            "at step 2; stopping", tmp_path, capsys)


@pytest.mark.parametrize("flag, name, needle", [
    ("--eval-ref", "missing.npz", "reference statistics not found"),
    ("--eval-ref", "ref.npz", "ref.npz is not a reference-statistics .npz"),  # (a text file)
    ("--eval-inception", "missing.pth", "Inception-v3 weights not found"),
    ("--eval-inception", "inception.pth", "could not read Inception-v3 weights"),
])
def test_eval_files_are_read_before_training(flag, name, needle, tmp_path, capsys):
    """A missing or unreadable --eval-ref/--eval-inception stopped training only at the first
    evaluation, after config.json, log.csv and a checkpoint were written."""
    (tmp_path / "files").mkdir()
    for garbage in ("ref.npz", "inception.pth"):
        (tmp_path / "files" / garbage).write_text("not this")
    argv = ["train", "--data", "digits", "--steps", "1", "--eval-every", "1", "--eval-n", "2", "--eval-sample-steps", "1",
            flag, str(tmp_path / "files" / name), "--out", str(tmp_path / "run"), *TINY]
    refused(argv, needle, tmp_path, capsys)


def test_in_loop_evaluation_of_folder_data_needs_inception_weights_up_front(tmp_path, capsys):
    """Data other than digits has no built-in feature network: this failed at the first evaluation."""
    from PIL import Image

    for k in range(2):
        (tmp_path / "imgs" / f"c{k}").mkdir(parents=True)
        Image.new("RGB", (8, 8), (k * 200, 0, 0)).save(tmp_path / "imgs" / f"c{k}" / "a.png")
    argv = ["train", "--data", f"folder:{tmp_path / 'imgs'}", "--image-size", "8", "--steps", "1", "--eval-every", "1",
            "--out", str(tmp_path / "run"), *TINY]
    refused(argv, "needs --eval-inception", tmp_path, capsys)


HUGE_SEED = str(10**20)  # torch: "Overflow when unpacking long long"


@pytest.mark.parametrize("argv", [
    ["train", "--data", "digits", "--steps", "1", "--out", "{tmp}/r", *TINY],
    ["train-mm", "--data", "shapes:train:8", "--steps", "1", "--out", "{tmp}/r", *MM_TINY],
    ["sample", "--ckpt", "{run}", "--n", "1", "--sample-steps", "1", "--out", "{tmp}/x.png"],
    ["eval", "--ckpt", "{run}", "--n", "2", "--sample-steps", "1"],
    ["ablate", "--suite", "order", "--budget", "1", "--out", "{tmp}/a"],  # made OUT/order first
    ["ablate", "--suite", "multimodal", "--steps", "1", "--out", "{tmp}/a"],  # wrote OUT/multimodal/runs.json first
])
def test_a_seed_the_generators_cannot_take_is_refused_naming_the_range(argv, run_dir, tmp_path, capsys):
    from causalfusion.sampling import SEED_RANGE

    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv] + ["--seed", HUGE_SEED]
    refused(argv, f"--seed must be an integer in {SEED_RANGE[0]}..{SEED_RANGE[1]}", tmp_path, capsys)


def test_the_seed_range_is_what_the_per_sample_generators_take():
    from causalfusion.sampling import SEED_RANGE, check_seed, sample_generators

    lo, hi = SEED_RANGE
    sample_generators(lo, [0])  # the ends work, for any sample index below 2**32
    sample_generators(hi, [2**32 - 1])
    for bad in (lo - 1, hi + 1, 1.0, True):
        with pytest.raises(ValueError, match="--seed must be an integer"):
            check_seed(bad)


@pytest.mark.parametrize("argv, needle", [
    (["train", "--data", "digits", "--steps", "1", *TINY, "--out", "{file}/run"], "cannot create --out {file}/run: {file} is a file"),
    (["train-mm", "--data", "shapes:train:8", "--steps", "1", *MM_TINY, "--out", "{file}/run"], "{file} is a file"),
    (["demo", "--out", "{file}/run"], "cannot create --out {file}/run: {file} is a file"),
    (["cache-latents", "--data", "digits", "--out", "{file}/c"], "cannot create --out {file}/c: {file} is a file"),
    (["cache-latents", "--data", "digits", "--out", "{file}"], "--out {file} is a file, not a directory"),
    (["ablate", "--suite", "order", "--budget", "1", "--out", "{file}"], "--out {file} is a file, not a directory"),
    (["ablate", "--suite", "multimodal", "--steps", "1", "--out", "{file}"], "cannot create --out {file}/multimodal"),
    (["convert-vae", "--ldm", "{tmp}/kl16.safetensors", "--out", "{file}/vae"], "cannot create --out {file}/vae"),
])
def test_an_output_directory_under_a_file_names_the_path(argv, needle, tmp_path, capsys):
    """mkdir's "[Errno 20] Not a directory" / "[Errno 17] File exists" named neither --out nor the file in the way."""
    file = tmp_path / "file"
    file.write_text("x")
    fmt = dict(file=file, tmp=tmp_path)
    refused([a.format(**fmt) for a in argv], needle.format(**fmt), tmp_path, capsys)


@pytest.mark.parametrize("argv", [
    ["sample", "--ckpt", "{run}", "--n", "1", "--sample-steps", "1", "--out", "{tmp}/x.png"],
    ["eval", "--ckpt", "{run}", "--n", "2", "--sample-steps", "1"],
    ["train", "--out", "{run}", "--resume", "--steps", "2", "--sample-every", "1", "--no-progress"],  # failed at its grid
])
def test_a_non_integer_autoencoder_channels_names_config_json(argv, run_dir, tmp_path, capsys):
    """A hand-edited autoencoder.channels failed with "invalid literal for int() with base 10: 'x'"."""
    import json
    import shutil

    run = shutil.copytree(run_dir, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "autoencoder": {"kind": "identity", "channels": "x"}}))
    argv = [a.format(run=run, tmp=tmp_path) for a in argv]
    refused(argv, f"{run / 'config.json'}: autoencoder.channels must be a positive integer, got 'x'", tmp_path, capsys)


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--ckpt", "{run}", "--n", "1000000000000", "--sample-steps", "1"], "more than half of this machine's"),
    (["sample", "--ckpt", "{run}", "--n", "1", "--sample-steps", "1", "--vae-path", "{tmp}"], "--vae-path applies to latent runs"),
    (["edit", "--ckpt", "{run}", "--generate-class", "3", "--class", "8", "--sample-steps", "1", "--vae-path", "{tmp}"],
     "--vae-path applies to latent runs"),
    (["train", "--data", "digits", "--channels", "2", "--out", "{tmp}/new", *TINY], "--channels"),
    (["ablate", "--suite", "ar-steps", "--eval-ar-steps", "0", "--steps", "1", "--out", "{tmp}/ab"], "S_eval must be >= 1"),
])
def test_options_that_cannot_apply_are_refused_before_any_work(argv, needle, run_dir, tmp_path, capsys):
    """Nothing under the run or the output root changes (content hashes compared)."""
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    before = snapshot(run_dir)
    refused(argv, needle, tmp_path, capsys)
    assert snapshot(run_dir) == before
