"""Read the run log that train_gpt.py writes (rank 0, logs/<RUN_ID>.txt) into a RunLog.

Every regular expression that understands the log lives here, so that all tools agree on one format.

    from tools.logparse import parse_log
    run = parse_log("logs/train_seed42.log")
    run.seed, run.final_stage, run.stages["quantized"].val_bpb, run.missing()

    python tools/logparse.py logs/train_seed42.log     # print what was parsed, as JSON
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import sys
from pathlib import Path

CHALLENGE_TIME_LIMIT_MS = 600_000  # training and evaluation, each (SPEC section 1)
ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal bytes: code + compressed model

# Stage names as the log writes them -> the short keys used everywhere else.
STAGES = {
    "pre-quantization post-ema": "pre_quant",
    "quantized": "quantized",
    "quantized_sliding_window": "sliding",
    "quantized_ttt": "ttt",
}
FINAL_STAGE_ORDER = ("ttt", "sliding", "quantized")  # the first one present is a seed's score

_NUM = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
_STAGE = "|".join(re.escape(name) for name in sorted(STAGES, key=len, reverse=True))

RE_SCRIPT = re.compile(r"^script: (\S+) (.*)$")
RE_CODE = re.compile(r"^code: (.*)$")
RE_RUN = re.compile(r"^run: (.*)$")
RE_ENV_SET = re.compile(r"^env_set:(.*)$")
RE_EVAL_SETTINGS = re.compile(r"^eval_settings:(.*)$")
RE_ENV = re.compile(r"^env: (.*)$")
RE_PRESET = re.compile(r"^preset: (\S+)(?: \((.*)\))?$")
RE_SETTINGS_HEADER = re.compile(r"^settings:\s*$")
RE_SETTING = re.compile(r"^  ([A-Z][A-Z0-9_]*)=(.*)$")
RE_DATA = re.compile(r"^data: (.*)$")
RE_MODEL_PARAMS = re.compile(r"^model_params:(\d+)$")
RE_TRAIN = re.compile(
    rf"^(\d+)/(\d+) train_loss: ({_NUM}) train_time: ({_NUM})ms step_avg: ({_NUM})ms(?: tok/s: ({_NUM}))?$"
)
RE_VAL = re.compile(rf"^(\d+)/(\d+) val_loss: ({_NUM}) val_bpb: ({_NUM})$")
RE_STOPPING = re.compile(r"^stopping_early: (\S+) train_time: (\d+)ms step: (\d+)/(\d+)$")
RE_BUDGET = re.compile(r"^train_budget: train_time:(\d+)ms calibration:(\d+)ms total:(\d+)ms limit:(\d+)ms$")
RE_COMPLIANCE = re.compile(r"^compliance: (.*)$")
RE_STAGE = re.compile(rf"^({_STAGE}) val_loss:({_NUM}) val_bpb:({_NUM}) eval_time:(\d+)ms$")
RE_STAGE_TOKENS = re.compile(rf"^({_STAGE}) val_tokens:(\d+) val_bytes:(\d+)$")
RE_MODEL_SIZE = re.compile(r"^Serialized model (\S+): (\d+) bytes$")
RE_CODE_SIZE = re.compile(r"^Code size: (\d+) bytes(?: \(readable: (\d+) bytes\))?$")
RE_TOTAL_SIZE = re.compile(r"^Total submission size (\S+): (\d+) bytes$")
RE_ARTIFACT = re.compile(r"^artifact: path=(\S+) fits:([01]) limit:(\d+) margin:(-?\d+)$")
RE_TTT_LEGALITY = re.compile(r"^ttt:legality (.*)$")
RE_EVAL_TOTAL = re.compile(r"^eval_total: time:(\d+)ms limit:(\d+)ms$")
RE_COMPLETE = re.compile(r"^run_complete\s*$")
RE_ERROR = re.compile(r"^error: (.*)$")
RE_WARNING = re.compile(r"^warning: (.*)$")
# "NAME=value NAME=value": a new item starts where an upper-case NAME= follows a space.
RE_ASSIGNMENT = re.compile(r"(?:^|(?<=\s))([A-Z][A-Z0-9_]*)=(.*?)(?=\s+[A-Z][A-Z0-9_]*=|\s*$)")
RE_SOURCED = re.compile(r"^(.*)\((artifact|env|default)\)$")  # eval_settings values: "2048(artifact)"
# "key:value key:value" where a value may hold spaces ("device:NVIDIA H100 80GB HBM3 gpus:8").
RE_PAIR = re.compile(r"(?:^|(?<=\s))(\w+):(.*?)(?=\s+\w+:|\s*$)")


def parse_pairs(text: str) -> dict[str, str]:
    """'a:1 device:NVIDIA H100 b:x' -> {'a': '1', 'device': 'NVIDIA H100', 'b': 'x'}."""
    return {m.group(1): m.group(2) for m in RE_PAIR.finditer(text)}


def parse_assignments(text: str) -> dict[str, str]:
    """'A=1 B=x y' -> {'A': '1', 'B': 'x y'} (the env_set: and eval_settings: lines)."""
    return {m.group(1): m.group(2) for m in RE_ASSIGNMENT.finditer(text.strip())}


@dataclasses.dataclass
class Stage:
    val_loss: float
    val_bpb: float
    eval_time_ms: int
    val_tokens: int | None = None
    val_bytes: int | None = None


@dataclasses.dataclass
class RunLog:
    path: str
    script: dict | None = None  # name, sha256, bytes, packed_sha256, packed_bytes
    script_lines: int = 0  # more than one: two runs appended to one file (RUN_ID reused)
    code: dict | None = None  # commit, dirty, git_blob (absent in logs before the code: line existed)
    env: dict = dataclasses.field(default_factory=dict)  # launcher, backend: absent in older logs
    run_info: dict | None = None  # id, log, artifact, model (the run: line)
    env_set: dict | None = None  # NAME -> text as given in the environment; None: the log predates env_set
    preset: str | None = None
    settings: dict = dataclasses.field(default_factory=dict)  # NAME -> repr text, as logged
    data: dict = dataclasses.field(default_factory=dict)
    model_params: int | None = None
    train: list = dataclasses.field(default_factory=list)  # (step, train_loss, train_time_ms)
    val: list = dataclasses.field(default_factory=list)  # (step, val_loss, val_bpb)
    stopping_early: dict | None = None
    eval_settings: dict = dataclasses.field(default_factory=dict)  # NAME -> (value text, artifact|env|default)
    train_budget: dict | None = None  # train_time_ms, calibration_ms, total_ms, limit_ms
    compliance: dict = dataclasses.field(default_factory=dict)
    stages: dict = dataclasses.field(default_factory=dict)  # short stage key -> Stage
    model_bytes: int | None = None
    code_bytes: int | None = None
    readable_code_bytes: int | None = None
    total_bytes: int | None = None
    compressor: str | None = None
    artifact: dict | None = None  # path, fits, limit, margin
    ttt_legality: dict | None = None
    eval_total: dict | None = None  # time_ms, limit_ms
    complete: bool = False
    errors: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)

    def setting(self, name: str, default=None):
        """A setting as a Python value (the log holds repr() text)."""
        if name not in self.settings:
            return default
        try:
            return ast.literal_eval(self.settings[name])
        except (ValueError, SyntaxError):
            return self.settings[name]

    @property
    def seed(self) -> int | None:
        return self.setting("SEED")

    @property
    def run_id(self) -> str | None:
        return self.setting("RUN_ID")

    @property
    def steps(self) -> int | None:
        """Optimizer steps taken: from stopping_early, else the last logged train/val step."""
        if self.stopping_early:
            return self.stopping_early["step"]
        logged = [p[0] for p in self.train] + [p[0] for p in self.val]
        return max(logged) if logged else None

    @property
    def train_time_ms(self) -> int | None:
        if self.train_budget:
            return self.train_budget["train_time_ms"]
        return self.stopping_early["train_time_ms"] if self.stopping_early else None

    @property
    def train_total_ms(self) -> int | None:
        """Training loop + GPTQ calibration: what the 600 s training rule covers."""
        if not self.train_budget:
            return None
        parts = self.train_budget["train_time_ms"] + self.train_budget["calibration_ms"]
        return max(parts, self.train_budget["total_ms"])

    @property
    def final_stage(self) -> str | None:
        return next((s for s in FINAL_STAGE_ORDER if s in self.stages), None)

    @property
    def final(self) -> Stage | None:
        key = self.final_stage
        return self.stages[key] if key else None

    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes per scored token, from the final stage's val_tokens/val_bytes line."""
        order = FINAL_STAGE_ORDER + ("pre_quant",)
        for key in order:
            st = self.stages.get(key)
            if st and st.val_tokens and st.val_bytes:
                return st.val_bytes / st.val_tokens
        return None

    def missing(self) -> list[str]:
        """What a finished run logs and this log lacks (empty for a complete log)."""
        need = {
            "script: line": self.script,
            "env: line": self.env,
            "settings: block": self.settings,
            "SEED setting": isinstance(self.seed, int),
            "train lines (step count)": self.steps is not None,
            "train_budget: line": self.train_budget,
            "compliance: line": self.compliance,
            "pre-quantization post-ema result": "pre_quant" in self.stages,
            "quantized result": "quantized" in self.stages,
            "Serialized model size line": self.model_bytes is not None,
            "Code size line": self.code_bytes is not None,
            "Total submission size line": self.total_bytes is not None,
            "artifact: line": self.artifact,
            "eval_total: line": self.eval_total,
            "run_complete line": self.complete,
        }
        if self.setting("SLIDING_WINDOW_ENABLED", False):
            need["quantized_sliding_window result"] = "sliding" in self.stages
        if self.setting("TTT_ENABLED", False):
            need["ttt:legality line"] = self.ttt_legality
            need["quantized_ttt result"] = "ttt" in self.stages
        lacking = [what for what, have in need.items() if not have]
        if self.script_lines > 1:
            lacking.append(f"a single run (found {self.script_lines} script: lines: RUN_ID reused, log appended)")
        return lacking


def _num(text: str) -> float:
    return float(text)


def parse_text(text: str, path: str = "<text>") -> RunLog:
    run = RunLog(path=str(path))
    in_settings = False
    counts = {}  # stage -> (val_tokens, val_bytes); a count line alone does not make a stage
    for raw in text.splitlines():
        line = raw.rstrip("\r\n")
        if in_settings:
            m = RE_SETTING.match(line)
            if m:
                run.settings[m.group(1)] = m.group(2)
                continue
            in_settings = False
        if RE_SETTINGS_HEADER.match(line):
            in_settings = True
        elif m := RE_TRAIN.match(line):
            run.train.append((int(m.group(1)), _num(m.group(3)), _num(m.group(4))))
        elif m := RE_VAL.match(line):
            run.val.append((int(m.group(1)), _num(m.group(3)), _num(m.group(4))))
        elif m := RE_STAGE.match(line):
            run.stages[STAGES[m.group(1)]] = Stage(_num(m.group(2)), _num(m.group(3)), int(m.group(4)))
        elif m := RE_STAGE_TOKENS.match(line):
            counts[STAGES[m.group(1)]] = (int(m.group(2)), int(m.group(3)))
        elif m := RE_SCRIPT.match(line):
            pairs = parse_pairs(m.group(2))
            run.script = {"name": m.group(1), **pairs}
            for key in ("bytes", "packed_bytes"):
                if key in run.script:
                    run.script[key] = int(run.script[key])
            run.script_lines += 1
        elif m := RE_CODE.match(line):
            run.code = parse_pairs(m.group(1))
        elif m := RE_ENV.match(line):
            run.env = parse_pairs(m.group(1))
        elif m := RE_RUN.match(line):
            run.run_info = parse_pairs(m.group(1))
        elif m := RE_ENV_SET.match(line):
            run.env_set = parse_assignments(m.group(1))
        elif m := RE_EVAL_SETTINGS.match(line):
            for name, text in parse_assignments(m.group(1)).items():
                sourced = RE_SOURCED.match(text)
                run.eval_settings[name] = (sourced.group(1), sourced.group(2)) if sourced else (text, None)
        elif m := RE_PRESET.match(line):
            run.preset = m.group(1)
        elif m := RE_DATA.match(line):  # EVAL_ONLY runs end the line with "(EVAL_ONLY: training data not read)"
            run.data = parse_pairs(re.sub(r"\s*\([^()]*\)\s*$", "", m.group(1)))
        elif m := RE_MODEL_PARAMS.match(line):
            run.model_params = int(m.group(1))
        elif m := RE_STOPPING.match(line):
            run.stopping_early = {"reason": m.group(1), "train_time_ms": int(m.group(2)),
                                  "step": int(m.group(3)), "iterations": int(m.group(4))}
        elif m := RE_BUDGET.match(line):
            run.train_budget = dict(zip(("train_time_ms", "calibration_ms", "total_ms", "limit_ms"),
                                        map(int, m.groups())))
        elif m := RE_COMPLIANCE.match(line):
            run.compliance = parse_pairs(m.group(1))
        elif m := RE_MODEL_SIZE.match(line):
            run.model_bytes = int(m.group(2))
            run.compressor = m.group(1).split("+")[-1]
        elif m := RE_CODE_SIZE.match(line):
            run.code_bytes = int(m.group(1))
            run.readable_code_bytes = int(m.group(2)) if m.group(2) else None
        elif m := RE_TOTAL_SIZE.match(line):
            run.total_bytes = int(m.group(2))
        elif m := RE_ARTIFACT.match(line):
            run.artifact = {"path": m.group(1), "fits": m.group(2) == "1",
                            "limit": int(m.group(3)), "margin": int(m.group(4))}
        elif m := RE_TTT_LEGALITY.match(line):
            run.ttt_legality = parse_pairs(m.group(1))
        elif m := RE_EVAL_TOTAL.match(line):
            run.eval_total = {"time_ms": int(m.group(1)), "limit_ms": int(m.group(2))}
        elif RE_COMPLETE.match(line):
            run.complete = True
        elif m := RE_ERROR.match(line):
            run.errors.append(m.group(1))
        elif m := RE_WARNING.match(line):
            run.warnings.append(m.group(1))
    for key, (tokens, nbytes) in counts.items():
        if key in run.stages:
            run.stages[key].val_tokens, run.stages[key].val_bytes = tokens, nbytes
    return run


def parse_log(path: str | Path) -> RunLog:
    return parse_text(Path(path).read_text(encoding="utf-8", errors="replace"), str(path))


def error_lines(path: str | Path, last: int = 5) -> list[str]:
    """The last `error:` lines of a (possibly partial) log; [] if the file is missing."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if RE_ERROR.match(line)][-last:]


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Print what tools/logparse.py reads from train_gpt.py logs, as JSON.")
    ap.add_argument("logs", nargs="+", help="log files (logs/<RUN_ID>.txt or train_seedN.log)")
    args = ap.parse_args(argv)
    for path in args.logs:
        run = parse_log(path)
        out = dataclasses.asdict(run)
        out["missing"] = run.missing()
        out["final_stage"] = run.final_stage
        json.dump(out, sys.stdout, indent=1, default=str)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
