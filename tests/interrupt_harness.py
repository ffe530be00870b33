"""Kill a merge at many points and check what it leaves (issue 8, item 3).

Run as a script (``python tests/interrupt_harness.py --work DIR [--budget small|large]``); it
prints one JSON object with every trial. One process imports modelstock once and forks a child
per trial; each child runs the real click command (``modelstock merge ...``) and is

- sent SIGINT, SIGTERM or SIGKILL by itself at the k-th I/O event (before or after each shard
  open/write/close, rename, exchange, removal, copy, mkdir, write_text), for every k;
- sent a second SIGINT right after the first (a user hammering Ctrl-C during the cleanup);
- killed by the parent after a random delay;
- made to fail with ENOSPC at the k-th write-like event (a full disk, at every point);
- run under RLIMIT_FSIZE (``ulimit -f``), so the kernel refuses to grow a file past a limit.

After each trial the output must be absent or complete (a fresh output), or the old output or
the complete new one (with ``--force``); after SIGINT/SIGTERM/ENOSPC no temporary may remain and
stderr must be one line; after SIGKILL a temporary may remain, and the next run's cleanup must
remove it (and put back an old output a kill left set aside).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import modelstock.output as mo  # noqa: E402
import modelstock.safetensors_io as sio  # noqa: E402
from modelstock.cli import entry_point  # noqa: E402

SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "KILL": signal.SIGKILL}
WRITE_LIKE = ("writer.open", "writer.write", "writer.close", "write_text", "copy2", "mkdir")
EXPECTED_EXIT = {"INT": 130, "TERM": 128 + signal.SIGTERM, "KILL": -signal.SIGKILL}


# -- inputs ----------------------------------------------------------------------------------

def build_inputs(work: Path) -> list[Path]:
    """An anchor and two fine-tunes: 7 tensors, ~450 KB each model (several output shards)."""
    g = torch.Generator().manual_seed(0)
    anchor = {f"layers.{i}.weight": torch.randn(128, 128, generator=g) for i in range(6)}
    anchor["layers.0.bias"] = torch.randn(128, generator=g)
    dirs = []
    for name, scale in [("anchor", 0.0), ("ft1", 0.05), ("ft2", 0.05)]:
        d = work / "inputs" / name
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in anchor.items()}
        save_file(state, d / "model.safetensors")
        (d / "config.json").write_text('{"model_type": "tiny"}\n')
        (d / "tokenizer.json").write_text('{"version": "1.0"}\n')
        dirs.append(d)
    return dirs


# -- the child -------------------------------------------------------------------------------

def instrument(on_event) -> None:
    """Call ``on_event(label)`` before and after every I/O step of writing an output."""
    def wrap(owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            on_event(f"{label}:before")
            result = original(*args, **kwargs)
            on_event(f"{label}:after")
            return result
        setattr(owner, attr, wrapper)

    wrap(sio.SafetensorsWriter, "__init__", "writer.open")
    wrap(sio.SafetensorsWriter, "write", "writer.write")
    wrap(sio.SafetensorsWriter, "close", "writer.close")
    wrap(os, "rename", "rename")
    wrap(os, "replace", "replace")
    wrap(mo, "_renameat2", "renameat2")
    wrap(mo, "_remove", "remove")
    wrap(shutil, "copy2", "copy2")
    wrap(Path, "write_text", "write_text")
    wrap(Path, "mkdir", "mkdir")


def run_child(argv: list[str], log: Path, trial: dict, ready_fd: int | None = None) -> None:
    """In the forked child: set up the trial's fault, run the CLI, exit with its status.
    A byte on ``ready_fd`` tells the parent that the set-up is done and the CLI starts."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    # Ctrl-C as in a terminal, even where this harness runs as a background job (whose SIGINT
    # is ignored, and would stay ignored in the child: the timed INT trials would test little)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    events: list[str] = []
    mode = trial["mode"]

    def on_event(label: str) -> None:
        events.append(label)
        k = len(events) - 1
        if mode == "signal" and k == trial["k"]:
            os.kill(os.getpid(), SIGNALS[trial["signal"]])
        elif mode == "double" and k in (trial["k"], trial["k"] + 1):
            os.kill(os.getpid(), signal.SIGINT)
        elif mode == "enospc" and k == trial["k"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if mode in ("signal", "double", "enospc", "count"):
        instrument(on_event)
    if trial.get("no_exchange"):
        mo._renameat2 = lambda a, b, flags: False  # a kernel or file system without renameat2
    if mode == "fsize":
        resource.setrlimit(resource.RLIMIT_FSIZE, (trial["limit"], trial["limit"]))
    code = 0
    if ready_fd is not None:
        os.write(ready_fd, b".")
    try:
        entry_point(argv, prog_name="modelstock")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001 - report anything that escaped the CLI
        print(f"ESCAPED {type(e).__name__}: {e}", file=sys.stderr)
        code = 99
    if mode == "count":
        (log.parent / "events.json").write_text(json.dumps(events))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


HUNG = "hung"  # the exit status of a child that outlived TRIAL_TIMEOUT_S (then killed)
TRIAL_TIMEOUT_S = 60.0  # a trial takes well under a second; one that hangs must not stall all


def _wait(pid: int, log: Path) -> int | str:
    """Wait for the child; past `TRIAL_TIMEOUT_S`, append its threads' kernel stacks (and
    Python stacks where py-spy is installed) to ``log``, kill it and return `HUNG`."""
    deadline = time.monotonic() + TRIAL_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            with open(log, "a") as f:
                f.write(f"\nHUNG after {TRIAL_TIMEOUT_S:g} s\n")
                for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
                    stack = task / "stack"
                    f.write(f"thread {task.name}: "
                            f"{stack.read_text() if os.access(stack, os.R_OK) else '?'}\n")
                f.flush()
                if shutil.which("py-spy"):
                    subprocess.run(["py-spy", "dump", "--pid", str(pid)], stdout=f,
                                   stderr=subprocess.STDOUT, timeout=30, check=False)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return HUNG
        time.sleep(0.002)


def fork_run(argv: list[str], log: Path, trial: dict, kill_after: float | None = None
             ) -> tuple[int | str, float]:
    """Run one child; return its exit status (negative: killed by that signal; `HUNG`: it
    outlived `TRIAL_TIMEOUT_S`) and seconds.

    With ``kill_after``, the signal goes that many seconds after the child's own set-up (fork
    hooks, redirections), so that it lands in the CLI and not in this harness."""
    start = time.perf_counter()
    ready_r, ready_w = os.pipe() if kill_after is not None else (None, None)
    pid = os.fork()
    if pid == 0:
        try:
            if ready_r is not None:
                os.close(ready_r)
            run_child(argv, log, trial, ready_w)
        finally:
            os._exit(98)
    if kill_after is not None:
        os.close(ready_w)
        os.read(ready_r, 1)  # b"" if the child died first
        os.close(ready_r)
        time.sleep(kill_after)
        try:
            os.kill(pid, SIGNALS[trial["signal"]])
        except ProcessLookupError:
            pass
    status = _wait(pid, log)
    seconds = time.perf_counter() - start
    if status == HUNG:
        return HUNG, seconds
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status), seconds
    return os.WEXITSTATUS(status), seconds


# -- inspecting an output --------------------------------------------------------------------

def snapshot(path: Path) -> dict[str, str] | None:
    """Hashes of an output (a file, or a directory's files); None if absent."""
    if not (path.exists() or path.is_symlink()):
        return None
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    snap = {}
    for p in sorted(path.iterdir()):
        snap[p.name] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return snap


VARIABLE = ("README.md", "modelstock_report.json")  # hold timings: parsed, not compared


def state_of(out: Path, new: dict[str, str], old: dict[str, str] | None) -> str:
    snap = snapshot(out)
    if snap is None:
        return "absent"
    if old is not None and snap == old:
        return "old"
    if set(snap) == set(new) and all(snap[k] == new[k] for k in snap if k not in VARIABLE):
        if out.is_dir():
            json.loads((out / "modelstock_report.json").read_text())
            if "model-stock" not in (out / "README.md").read_text():
                return "corrupt"
        return "new"
    return "corrupt"


def reset(out: Path, pristine: Path | None, new: dict, old: dict | None) -> None:
    """Before a trial: no output, or (for --force) the old output exactly as it was."""
    if pristine is None:
        mo._remove(out)
    elif state_of(out, new, old) != "old":
        mo._remove(out)
        copy = shutil.copytree if pristine.is_dir() else shutil.copy2
        copy(pristine, out)


def temps(out: Path) -> list[str]:
    prefix = f".{out.name}{mo.TMP_TAG}"
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(prefix))


# -- scenarios -------------------------------------------------------------------------------

def run(work: Path, budget: str, seed: int) -> dict:
    rng = random.Random(seed)
    inputs = [str(p) for p in build_inputs(work)]
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    shard = ["--shard-size", "150KB", "-q"]
    scenarios = [
        {"name": "dir-fresh", "out": "merged", "force": False},
        {"name": "dir-force", "out": "merged", "force": True},
        {"name": "dir-force-no-exchange", "out": "merged", "force": True, "no_exchange": True},
        {"name": "file-force", "out": "merged.safetensors", "force": True},
    ]
    trials: list[dict] = []
    summary: dict[str, dict] = {}
    for sc in scenarios:
        base = work / sc["name"]
        base.mkdir()
        out = base / sc["out"]
        argv = ["merge", *inputs, "-o", str(out), *shard] + (["--force"] if sc["force"] else [])
        # The complete new output, and (for --force) an old one to protect.
        ref = base / ("ref" + Path(sc["out"]).suffix)
        code, _ = fork_run(["merge", *inputs, "-o", str(ref), *shard], logs / "ref.log",
                           {"mode": "plain"})
        assert code == 0, (logs / "ref.log").read_text()
        new = snapshot(ref)
        old = pristine = None
        if sc["force"]:
            pristine = base / ("pristine" + Path(sc["out"]).suffix)
            code, _ = fork_run(["merge", *inputs, "-o", str(pristine), *shard, "--method",
                                "uniform"], logs / "old.log", {"mode": "plain"})
            assert code == 0, (logs / "old.log").read_text()
            old = snapshot(pristine)

        # The I/O events of this very scenario (a run that is not interrupted).
        reset(out, pristine, new, old)
        code, duration = fork_run(argv, logs / "count.log", {"mode": "count", **sc})
        assert code == 0, (logs / "count.log").read_text()
        events = json.loads((logs / "events.json").read_text())
        plan: list[dict] = []
        n = len(events)
        names = list(SIGNALS)
        large = budget == "large"
        # small: every event of the first two scenarios, every third of the others
        step = 1 if large or sc["name"] in ("dir-fresh", "dir-force") else 3
        for k in range(0, n, step):
            sigs = names if large else [names[(k // step) % 3]]
            plan += [{"mode": "signal", "k": k, "signal": s} for s in sigs]
        double = range(n) if large else range(1, n, max(1, n // 4))
        plan += [{"mode": "double", "k": k, "signal": "INT"} for k in double]
        write_like = [k for k, e in enumerate(events) if e.split(":")[0] in WRITE_LIKE
                      and e.endswith(":before")]
        plan += [{"mode": "enospc", "k": k} for k in write_like[:: 1 if large else 2]]
        plan += [{"mode": "timed", "signal": rng.choice(names),
                  "delay": rng.uniform(0, 1.2 * duration)} for _ in range(150 if large else 3)]
        shard_bytes = max(p.stat().st_size for p in ([ref] if ref.is_file() else ref.iterdir()))
        limits = [1024, shard_bytes // 2, shard_bytes - 1]  # stderr needs < 1 KB of its own
        plan += [{"mode": "fsize", "limit": lim} for lim in (limits if large else limits[1:])]

        counts: dict[str, int] = {}
        for trial in plan:
            trial = dict(trial, scenario=sc["name"], no_exchange=sc.get("no_exchange", False))
            if "k" in trial:
                trial["event"] = events[trial["k"]]
            reset(out, pristine, new, old)
            log = logs / f"trial-{len(trials)}.log"
            kill_after = trial["delay"] if trial["mode"] == "timed" else None
            code, _ = fork_run(argv, log, trial, kill_after)
            trial["exit"] = code
            trial["stderr"] = log.read_text()[-400:] if log.exists() else ""
            trial["state"] = state_of(out, new, old)
            trial["temps_left"] = temps(out)
            problems = check(trial, sc["force"])
            if trial["temps_left"] or trial["state"] == "absent":
                mo._remove_stale_temps(out)  # what the next run does first
                trial["after_cleanup"] = state_of(out, new, old)
                if temps(out):
                    problems.append(f"temps survive the next run's cleanup: {temps(out)}")
                allowed = {"old", "new"} if sc["force"] else {"absent", "new"}
                if trial["after_cleanup"] not in allowed:
                    problems.append(f"after cleanup the output is {trial['after_cleanup']}")
            trial["problems"] = problems
            trials.append(trial)
            key = f"{trial['mode']}:{trial['state']}"
            counts[key] = counts.get(key, 0) + 1
        summary[sc["name"]] = {"events": n, "trials": len(plan), "states": counts,
                               "reference_seconds": round(duration, 4)}
    bad = [t for t in trials if t["problems"]]
    kinds: dict[str, int] = {}
    for t in bad:
        for p in t["problems"]:
            key = f"{t['scenario']}: {p.split(':')[0]}"
            kinds[key] = kinds.get(key, 0) + 1
    return {"budget": budget, "seed": seed, "trials": len(trials), "failures": len(bad),
            "problems": kinds, "summary": summary, "failed": bad[:20]}


def check(trial: dict, force: bool) -> list[str]:
    """What is wrong with a finished trial (empty: nothing)."""
    problems = []
    state, code, mode = trial["state"], trial["exit"], trial["mode"]
    if code == HUNG:
        return [f"the merge hung (killed after {TRIAL_TIMEOUT_S:g} s; stacks in its log)"]
    killed = mode in ("signal", "timed") and trial["signal"] == "KILL"
    if state == "corrupt":
        problems.append("the output is neither absent/old nor complete")
    if force and state == "absent" and not (killed and trial["no_exchange"]):
        problems.append("an existing output vanished under --force")
    if not force and state == "old":
        problems.append("impossible state")
    if "ESCAPED" in trial["stderr"] or "Traceback" in trial["stderr"]:
        problems.append("a traceback or an exception escaped the CLI")
    if not killed and trial["temps_left"]:
        problems.append(f"temporaries left: {trial['temps_left']}")
    lines = [ln for ln in trial["stderr"].splitlines() if ln.strip()]
    if mode in ("signal", "timed"):
        allowed = {0, EXPECTED_EXIT[trial["signal"]]}
        if mode == "timed":  # a signal before the CLI set its handlers: nothing was started
            allowed.add(-SIGNALS[trial["signal"]])
            # a signal in this harness's own code around main() (just before it, or after it
            # returned), which ends the child with run_child's fallback status, 98, and no
            # message; the state checks above and below still apply
            if code == 98 and not trial["stderr"]:
                allowed.add(98)
            if "Aborted!" in trial["stderr"]:  # click's own SIGINT message
                allowed.add(1)
        if code not in allowed:
            problems.append(f"exit status {code}")
        if code > 0 and code != 98 and len(lines) != 1:
            problems.append("stderr is not one line")
        if code == 0 and state != "new":
            problems.append("exit 0 without a complete output")
    elif mode == "double":
        if code not in (0, 130):
            problems.append(f"exit status {code}")
    elif mode in ("enospc", "fsize"):
        if code == 0:
            if state != "new":
                problems.append("exit 0 without a complete output")
        elif code != 1 or len(lines) != 1 or "nothing was written" not in lines[0]:
            problems.append(f"exit {code}, stderr {lines}")
        elif state == "new":
            problems.append("failed but the new output is in place")
    return problems


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="an empty scratch directory")
    parser.add_argument("--budget", choices=["small", "large"], default="small")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(args.work, args.budget, args.seed), indent=1))
