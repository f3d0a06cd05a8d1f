"""The command line `rcg`, end to end: `python -m gateway.cli` as a subprocess against the real
service (make_service) and the emulator; its input parsing and job planning in process."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from gateway import cli
from replicate_emulator import read_stamp

from helpers import ADMIN_KEY, ROOT, wait_for

PROMPTS = [f"prompt number {i}: a lighthouse in a storm" for i in range(30)]
NAMES = [f"shot_{i:02d}" for i in range(30)]


def cli_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCG_")}
    return {**env, "RCG_URL": url, "RCG_ADMIN_KEY": ADMIN_KEY, "PYTHONPATH": str(ROOT), **extra}


def rcg(url: str, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, env=cli_env(url, **extra),
                          capture_output=True, text=True, timeout=120)


def write_csv(path: Path, prompts: list[str], names: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "filename"])
        writer.writerows(zip(prompts, names, strict=True))
    return path


def images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in folder.iterdir() if p.suffix == ".webp"}


def results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_a_csv_batch_saves_every_prompt_under_its_own_name(make_service, emu, tmp_path):
    service = make_service()
    out = tmp_path / "images"
    done = rcg(service.url, "batch", str(write_csv(tmp_path / "p.csv", PROMPTS, NAMES)), "--model", "flux-dev",
               "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and len(done.stdout.splitlines()) == 2  # not a terminal: the summary only
    assert "30 succeeded" in done.stdout
    saved = images(out)
    assert sorted(saved) == NAMES
    for prompt, name in zip(PROMPTS, NAMES, strict=True):
        assert read_stamp(saved[name])["prompt"] == prompt
    lines = results(out)
    assert [r["index"] for r in lines] == list(range(30)) and [r["prompt"] for r in lines] == PROMPTS
    for record, name in zip(lines, NAMES, strict=True):
        assert record["files"] == [str(out / f"{name}.webp")] and record["error"] is None
        assert record["prediction_id"]
    assert emu.stats()["counters"]["creates"] == 30


def test_an_interrupted_batch_resumes_without_creating_or_downloading_anything_twice(make_service, emu,
                                                                                     tmp_path):
    emu.set_faults(latency_s=1.0)
    service = make_service(REPLICATE_CONCURRENT_LIMIT=5)
    out, source = tmp_path / "images", write_csv(tmp_path / "p.csv", PROMPTS, NAMES)
    args = ["-m", "gateway.cli", "batch", str(source), "--model", "flux-dev", "--out", str(out)]
    first = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=cli_env(service.url),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: out.is_dir() and len(images(out)) >= 3, seconds=60)
    finally:
        first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=30)
    assert first.returncode == 130 and "run the same command again" in err
    before = {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in images(out).items()}
    assert 3 <= len(before) < 30
    assert not list(out.glob(".*")) and not (out / "results.jsonl").exists()  # no temp file, no partial results

    again = rcg(service.url, "batch", str(source), "--model", "flux-dev", "--out", str(out), "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["already_present"] == len(before) and summary["downloaded"] == 30 - len(before)
    saved = images(out)
    assert sorted(saved) == NAMES
    assert all((saved[n].stat().st_ino, saved[n].stat().st_mtime_ns) == stamp for n, stamp in before.items())
    assert all(read_stamp(saved[n])["prompt"] == p for p, n in zip(PROMPTS, NAMES, strict=True))
    assert emu.stats()["counters"]["creates"] == 30
    assert len(results(out)) == 30


def test_a_failed_item_exits_1_with_its_error_and_rows_keep_their_own_parameters(make_service, emu, tmp_path):
    service = make_service()
    source = tmp_path / "p.jsonl"
    rows = [{"prompt": "a quiet harbour"}, {"prompt": "a broken one [[fail]]", "filename": "broken"},
            {"prompt": "a wide desert", "aspect_ratio": "16:9"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "images"
    done = rcg(service.url, "batch", str(source), "--model", "flux-dev", "--out", str(out), "--json")
    assert done.returncode == 1
    assert "row 1 failed" in done.stderr
    summary = json.loads(done.stdout)
    assert len(summary["jobs"]) == 2 and (summary["succeeded"], summary["failed"]) == (2, 1)
    lines = results(out)
    assert [r["prompt"] for r in lines] == [r["prompt"] for r in rows]
    assert lines[1]["status"] == "failed" and lines[1]["error"] and lines[1]["files"] == []
    assert lines[0]["files"] == [str(out / "row_0.webp")] and lines[2]["files"] == [str(out / "row_2.webp")]
    with Image.open(out / "row_0.webp") as square, Image.open(out / "row_2.webp") as wide:
        assert square.width == square.height and wide.width > wide.height


def test_no_wait_prints_the_job_id_and_jobs_show_finds_it(make_service, emu, tmp_path):
    service = make_service()
    source = tmp_path / "p.txt"
    source.write_text("a red kite\n\n  a blue kite  \n")
    submitted = rcg(service.url, "batch", str(source), "--model", "flux-dev", "--no-wait")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id.startswith("job_")
    assert rcg(service.url, "batch", str(source), "--model", "flux-dev", "--no-wait").stdout.strip() == job_id
    shown = rcg(service.url, "jobs", "show", job_id, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["job_id"] == job_id
    assert [i["prompt"] for i in json.loads(shown.stdout)["items"]] == ["a red kite", "a blue kite"]
    assert job_id in rcg(service.url, "jobs", "show", job_id).stdout
    assert job_id in rcg(service.url, "jobs", "list").stdout
    missing = rcg(service.url, "jobs", "show", "job_nosuchjob")
    assert missing.returncode == 2 and "404" in missing.stderr
    assert emu.stats()["counters"]["creates"] == 2


def test_generate_prints_its_files_and_a_rerun_reattaches(make_service, emu, tmp_path):
    service = make_service()
    out = tmp_path / "one"
    first = rcg(service.url, "generate", "a lighthouse at dawn", "--model", "flux-dev", "--out", str(out))
    assert first.returncode == 0, first.stderr
    [path] = first.stdout.split()
    assert Path(path).parent == out and read_stamp(path)["prompt"] == "a lighthouse at dawn"
    again = rcg(service.url, "generate", "a lighthouse at dawn", "--model", "flux-dev", "--out", str(out))
    assert again.stdout.split() == [path]
    assert emu.stats()["counters"]["creates"] == 1
    assert "aspect_ratio" in rcg(service.url, "models", "flux-dev").stdout
    assert rcg(service.url, "status", "--json").returncode == 0


def test_a_bad_key_or_an_unreachable_gateway_fails_cleanly_without_showing_a_secret(make_service, emu, tmp_path):
    service = make_service()
    wrong = "wrong-key-sekrit-0123456789"
    source = tmp_path / "p.txt"
    source.write_text("a red kite\n")
    for done in (rcg(service.url, "jobs", "list", RCG_ADMIN_KEY=wrong),
                 rcg(service.url, "batch", str(source), "--model", "flux-dev", "--out", str(tmp_path / "o"),
                     "--json", RCG_ADMIN_KEY=wrong),
                 rcg(service.url, "jobs", "list", "--admin-key", wrong)):
        assert done.returncode == 2 and "401" in done.stderr
        assert wrong not in done.stdout + done.stderr and "Traceback" not in done.stderr
    gone = rcg("http://user:pw-sekrit-42@127.0.0.1:9", "jobs", "list", RCG_ADMIN_KEY=wrong)
    assert gone.returncode == 3 and "cannot reach the gateway" in gone.stderr
    assert "pw-sekrit-42" not in gone.stderr and wrong not in gone.stderr
    unusable = rcg(service.url, "jobs", "list", RCG_ADMIN_KEY="line\nbreak-sekrit")
    assert unusable.returncode == 2 and "sekrit" not in unusable.stderr
    assert emu.stats()["counters"].get("creates", 0) == 0


def test_input_files_and_job_planning(tmp_path):
    assert [cli.parse_value(v) for v in ("7", "0.5", "true", "null", "16:9", "NaN", "1e999", "png")] == \
        [7, 0.5, True, None, "16:9", "NaN", "1e999", "png"]
    source = tmp_path / "p.csv"
    source.write_text("prompt,custom_id,seed,output_format\na cat,001,3,png\na dog,,,\n")
    rows, data = cli.read_rows(source)
    assert [(r.prompt, r.name, r.params) for r in rows] == [("a cat", "001", {"seed": 3, "output_format": "png"}),
                                                            ("a dog", None, {})]
    plans = cli.plan_jobs(rows, "flux-dev", {"seed": 1}, 1000, "digest")
    assert [p.body for p in plans] == [
        {"model_name": "flux-dev", "seed": 3, "output_format": "png", "prompts": ["a cat"],
         "custom_filenames": ["001"]},
        {"model_name": "flux-dev", "seed": 1, "prompts": ["a dog"], "custom_filenames": ["row_1"]}]
    assert [p.key for p in plans] == [p.key for p in cli.plan_jobs(rows, "flux-dev", {"seed": 1}, 1000, "digest")]
    assert plans[0].key != cli.plan_jobs(rows, "flux-dev", {"seed": 1}, 1000, "other")[0].key
    split = cli.plan_jobs([cli.Row(i, f"p{i}") for i in range(5)], "flux-dev", {}, 2, "d")
    assert [[r.index for r in p.rows] for p in split] == [[0, 1], [2, 3], [4]]
    assert split[2].body["custom_filenames"] == ["row_4"]
    alone = cli.plan_jobs([cli.Row(i, f"p{i}") for i in range(3)], "flux-dev", {}, 10, "d")
    assert "custom_filenames" not in alone[0].body  # one job, no names: the service's own names
    with pytest.raises(cli.CliError) as twice:
        cli.plan_jobs([cli.Row(0, "a", "Car.png"), cli.Row(1, "b", "car")], "flux-dev", {}, 10, "d")
    assert twice.value.code == 2 and "rows 0 and 1" in twice.value.message


@pytest.mark.parametrize("content, message", [
    ("prompt\n\"\"\n", "'prompt' must be a non-empty string"),
    ("text,seed\nx,1\n", "needs a 'prompt' column"),
    ("prompt,prompts\nx,y\n", "'prompts' cannot be a per-row parameter"),
])
def test_a_bad_input_file_is_a_usage_error_naming_the_line(tmp_path, content, message, capsys):
    source = tmp_path / "bad.csv"
    source.write_text(content)
    code = cli.main(["--url", "http://127.0.0.1:9", "--admin-key", "k" * 20, "batch", str(source),
                     "--model", "flux-dev", "--out", str(tmp_path / "o")])
    assert code == 2 and message in capsys.readouterr().err
