"""``arwkv hybridize``: give back the teacher's attention in the layers where the student's time
mixing does worst, and write the result as a new student checkpoint (a hybrid).

Each time-mixing layer gets a score (``--score``), the higher the worse its time mixing does:

- ``alignment`` (the default with ``--run``): its stage-1 alignment loss (the RMS error of its
  output against the teacher attention's output on held-out text, ``distill.alignment_loss``),
  from a stage-1 run directory (``--run``: the latest record of RUN/metrics.jsonl that holds the
  held-out per-layer losses ``val_layer_I``, written when the run had --validation-fraction), or
  measured here on ``--data`` (``AttentionAligner`` without backward: the packing and loss of
  stage 1's validation). Free after stage 1, but a local measure: an error in a layer whose
  attention output is small scores low, however much the layers after it amplify it.
- ``restore`` (the default with ``--data``): measured there, end to end: how much the whole
  student's KL(teacher || student) per token drops when that layer alone gets the teacher's
  attention back (``measure_restore_gains``; one student forward over the rows per layer). On
  the demo it chose the layers that helped after stage 2, where the alignment loss chose the
  ones that helped least (benchmarks/results/hybrid-layers.md).
- none when ``--layers`` names the layers by hand.

``pick="worst"`` keeps attention in the K layers with the highest score, ``"best"`` in the K
lowest (the opposite choice, for ablations). A student that is already a hybrid keeps its
attention layers and gains K more.

The output is a complete student checkpoint: config.json with the new ``wkv_layers``, the
student's tensors for everything else (norms, MLPs, embeddings, the other time mixers and any
attention it already kept, bit for bit), the teacher's tensors under
``model.layers.I.self_attn.*`` in each chosen layer (cast to the student's dtype), the student's
tokenizer and generation files, the model code (as save_pretrained writes it), and
``hybridize.json`` (scores, their source, pick, chosen layers). Written to a temporary directory
and renamed into place (files.atomic_directory), as ``arwkv convert`` does.

RWKV-7's value residual: the first time-mixing layer makes ``v_first`` and the later ones mix it
in. When that layer becomes attention, the next time-mixing layer becomes the first: the model
handles it (Rwkv7TimeMixer.forward makes v_first in whichever layer comes first), but that
layer's value-residual mix (v0, v1, v2) then goes unused and its output was tuned with a v_first
it no longer gets. Stage 2 (logit distillation) afterwards re-tunes the whole hybrid, which is
the intended next step after hybridize in any case.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.rows import collate
from ..files import atomic_directory
from ..loading import (
    SafetensorsCheckpoint,
    check_teacher_dir,
    load_student,
    load_teacher,
    load_tokenizer,
    open_student_tensors,
    quiet_transformers,
)
from ..models.configuration_rwkv_hybrid import RwkvHybridConfig
from ..runtime import ConfigError, torch_dtype_name
from .convert import COPIED_FILES

Tensor = torch.Tensor
REPORT = "hybridize.json"
PICKS = ("worst", "best")
SCORES = ("alignment", "restore")  # what a layer is judged by (see the module's docstring)
_VAL_LAYER = re.compile(r"^val_layer_(\d+)$")


class HybridizeError(ConfigError):
    """A request arwkv hybridize cannot carry out; the message is one line naming what is wrong."""


@dataclass
class LayerScores:
    """Per-layer alignment losses (layer index -> loss) and where they come from (``source``:
    {"kind": "run", "run", "step"} or {"kind": "data", "data", "rows", "seq_len", ...})."""

    scores: dict[int, float]
    source: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- scores


def scores_from_run(run_dir: str | os.PathLike) -> LayerScores:
    """The held-out per-layer losses (``val_layer_I``) of the latest validation record of a
    stage-1 run's RUN/metrics.jsonl."""
    from ..training.monitor import METRICS, read_metrics

    run = Path(run_dir)
    if not run.is_dir():
        raise HybridizeError(f"--run {run} is not a directory (give a stage-1 run directory: the --out "
                             "of arwkv distill --stage 1)")
    records = read_metrics(run)
    if not records:
        raise HybridizeError(f"--run {run} has no {METRICS} with training records (is it an arwkv distill "
                             "run directory?)")
    for record in reversed(records):  # the latest validation wins
        scores = {int(m.group(1)): float(v) for k, v in record.items() if (m := _VAL_LAYER.match(k))}
        if scores:
            return LayerScores(dict(sorted(scores.items())),
                               {"kind": "run", "run": str(run), "step": record["step"],
                                "stage": record.get("stage")})
    stage = records[-1].get("stage")
    why = (f"it is a stage-{stage} run; per-layer losses come from stage 1" if stage not in (None, 1)
           else "the run had no --validation-fraction")
    raise HybridizeError(f"--run {run}/{METRICS} holds no held-out per-layer losses (val_layer_*): {why}. "
                         "Rerun stage 1 with --validation-fraction (e.g. 0.05), or score the layers here "
                         "with --data FILE")


def measure_scores(teacher_dir: str | os.PathLike, student_dir: str | os.PathLike, data: str | os.PathLike,
                   *, rows: int = 64, seq_len: int = 512, batch_size: int = 8,
                   validation_fraction: float = 0.0, seed: int = 0, loss: str = "rms",
                   device: str = "auto") -> LayerScores:
    """Each time-mixing layer's mean alignment loss over the first ``rows`` packed rows of
    ``seq_len`` tokens of ``data`` (or of its validation split, as arwkv distill makes it with
    ``validation_fraction`` and ``seed``): stage 1's loss without its backward, the teacher in its
    own dtype, the student's time mixers in float32. With the run's fraction, seed, seq_len and
    all the rows, this is the run's own final ``val_layer_I``."""
    from ..training.losses import AttentionAligner

    packed, dev = _measurement_rows(student_dir, data, rows, seq_len, batch_size, validation_fraction, seed,
                                    device)
    teacher = load_teacher(teacher_dir, dev)
    student = load_student(student_dir).eval()
    for layer in student.model.layers:  # only the time mixers run (on the teacher's inputs)
        if layer.is_wkv:
            layer.self_attn.to(dev)
    aligner = AttentionAligner(teacher, student, loss)
    # rows all hold seq_len tokens: the mean over batches weighted by rows is the mean over tokens
    sums = torch.zeros(len(aligner.layers), dtype=torch.float64)
    for start in range(0, len(packed), batch_size):
        chunk = packed[start:start + batch_size]
        batch = {k: v.to(dev) for k, v in collate(chunk).items()}
        losses = aligner.step(batch["input_ids"], position_ids=batch["position_ids"],
                              cu_seqlens=batch["cu_seqlens"], backward=False)
        sums += torch.tensor(losses, dtype=torch.float64) * len(chunk)
    means = (sums / len(packed)).tolist()
    return LayerScores(dict(zip(aligner.layers, means, strict=True)),
                       {"kind": "data", "data": str(data), "rows": len(packed), "rows_asked": rows,
                        "seq_len": seq_len, "validation_fraction": validation_fraction, "seed": seed,
                        "loss": loss, "device": dev.type})


@contextlib.contextmanager
def _attention_in(student, teacher, layer: int) -> Iterator[None]:
    """Inside: the student's ``layer`` runs a float32 copy of the teacher's attention there (as in a
    hybrid that keeps it), its time mixer set aside; everything is put back on leaving."""
    model, block = student.model, student.model.layers[layer]
    saved = block.self_attn, block.is_wkv, model.rotary_emb
    device = next(block.parameters()).device
    block.self_attn = copy.deepcopy(teacher.model.layers[layer].self_attn).to(device, torch.float32)
    block.is_wkv = False
    if model.rotary_emb is None:  # a pure student has no rotary embedding: the teacher's is the same
        model.rotary_emb = teacher.model.rotary_emb
    try:
        yield
    finally:
        block.self_attn, block.is_wkv, model.rotary_emb = saved


def measure_restore_gains(teacher_dir: str | os.PathLike, student_dir: str | os.PathLike,
                          data: str | os.PathLike, *, rows: int = 64, seq_len: int = 512, batch_size: int = 8,
                          validation_fraction: float = 0.0, seed: int = 0,
                          device: str = "auto") -> LayerScores:
    """Each time-mixing layer's gain from getting the teacher's attention back, alone: the
    student's KL(teacher || student) per token on the first ``rows`` packed rows of ``data`` (or
    of its validation split), minus the same KL with only that layer's attention restored.
    Measured end to end (the whole student runs, in float32), so it sees what the per-layer
    alignment loss cannot: how much a layer's error costs at the output, after every later
    layer. The larger the gain, the more that layer is worth keeping as attention; K layers are
    then the K largest single-layer gains (not re-measured together)."""
    from ..training.losses import LogitDistillation

    packed, dev = _measurement_rows(student_dir, data, rows, seq_len, batch_size, validation_fraction, seed,
                                    device)
    teacher = load_teacher(teacher_dir, dev)
    student = load_student(student_dir).to(dev).eval().requires_grad_(False)
    objective = LogitDistillation(student)
    batches = [{k: v.to(dev) for k, v in collate(packed[i:i + batch_size]).items()}
               for i in range(0, len(packed), batch_size)]
    with torch.no_grad():
        hidden = [teacher.model(b["input_ids"], position_ids=b["position_ids"], use_cache=False)
                  .last_hidden_state for b in batches]
    head = teacher.get_output_embeddings().weight

    @torch.no_grad()
    def kl() -> float:  # per token over all rows (every row holds seq_len tokens)
        total = sum(float(objective(b["input_ids"], b["cu_seqlens"], b["labels"], h, head)[1])
                    * len(b["input_ids"]) for b, h in zip(batches, hidden, strict=True))
        return total / len(packed)

    baseline = kl()
    gains = {}
    for i, layer in enumerate(student.model.layers):
        if layer.is_wkv:
            with _attention_in(student, teacher, i):
                gains[i] = baseline - kl()
    return LayerScores(gains, {"kind": "restore", "data": str(data), "rows": len(packed), "rows_asked": rows,
                               "seq_len": seq_len, "validation_fraction": validation_fraction, "seed": seed,
                               "kl": baseline, "device": dev.type})


def _measurement_rows(student_dir, data, rows: int, seq_len: int, batch_size: int, validation_fraction: float,
                      seed: int, device: str) -> tuple[list, torch.device]:
    """The first ``rows`` packed rows of ``seq_len`` tokens of ``data`` (of its validation split
    with a fraction > 0, as arwkv distill splits it), and the device to measure on."""
    from ..data.records import DataError
    from ..data.rows import DocumentRows
    from ..data.tokenize import open_data
    from ..runtime import resolve_device

    if rows < 1 or seq_len < 2 or batch_size < 1:
        raise HybridizeError(f"--rows {rows}, --seq-len {seq_len}, --batch-size {batch_size}: need "
                             "rows >= 1, seq_len >= 2, batch_size >= 1")
    if not Path(data).exists():
        raise HybridizeError(f"--data {data} does not exist")
    dev = resolve_device(device)
    tokenizer = load_tokenizer(student_dir, "--student")
    tokens = open_data(data, tokenizer, validation_fraction=validation_fraction, seed=seed)
    try:
        cut = DocumentRows(tokens.validation if validation_fraction else tokens.train, seq_len)
        packed = [cut[r] for r in range(min(rows, len(cut)))]
    finally:
        tokens.close()
    if not packed:
        raise DataError(f"--data {data} gives no row of {seq_len} tokens"
                        + (f" in its {validation_fraction} validation split" if validation_fraction else "")
                        + "; use more text or a shorter --seq-len")
    return packed, dev


def choose_layers(scores: dict[int, float], candidates: list[int], keep: int,
                  pick: str = "worst") -> list[int]:
    """The ``keep`` candidate layers with the highest scores (``pick="worst"``) or the lowest
    (``"best"``), in layer order; ties go to the lower layer index."""
    if pick not in PICKS:
        raise HybridizeError(f"--pick {pick!r}: expected one of {', '.join(PICKS)}")
    missing = [i for i in candidates if i not in scores]
    if missing:
        raise HybridizeError(f"no score for time-mixing layer(s) {missing}")
    sign = -1.0 if pick == "worst" else 1.0
    ranked = sorted(candidates, key=lambda i: (sign * scores[i], i))
    return sorted(ranked[:keep])


# ----------------------------------------------------------------------------- checks


def _open_teacher(path: str | os.PathLike, student: RwkvHybridConfig) -> SafetensorsCheckpoint:
    """The teacher checkpoint, refused unless it is the student's own teacher's shape."""
    check_teacher_dir(path, "--teacher")
    ckpt = SafetensorsCheckpoint(path, "--teacher")
    t = ckpt.config
    if t.model_type != student.teacher_model_type:
        raise HybridizeError(f"--teacher {path} is a {t.model_type!r} model, the student's teacher a "
                             f"{student.teacher_model_type!r} one")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        a, b = getattr(t, key, None), getattr(student, key, None)
        if a != b:
            raise HybridizeError(f"--teacher {path} does not match the student: {key} {a} (teacher) vs {b} "
                                 "(student); give the student's own teacher")
    return ckpt


def _check_out(out: Path, overwrite: bool, *inputs: tuple[str, str | os.PathLike | None]) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise HybridizeError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    for flag, path in inputs:
        if path is not None and out.exists() and Path(path).exists() and out.samefile(path):
            raise HybridizeError(f"--out {out} is the {flag} directory; write the hybrid elsewhere")


# ----------------------------------------------------------------------------- the command


@dataclass
class HybridizeResult:
    """What was written: the checkpoint directory and its hybridize.json report."""

    path: Path
    report: dict


def hybridize(teacher_dir: str | os.PathLike, student_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
              keep: int | None = None, layers: list[int] | None = None, run: str | os.PathLike | None = None,
              data: str | os.PathLike | None = None, rows: int = 64, seq_len: int = 512, batch_size: int = 8,
              validation_fraction: float = 0.0, seed: int = 0, loss: str = "rms", device: str = "auto",
              pick: str = "worst", score: str | None = None, overwrite: bool = False) -> HybridizeResult:
    """Writes ``out_dir``: the student with the teacher's attention restored in ``keep`` more
    layers, chosen by their scores (from ``run``, or measured on ``data``; see the module's
    docstring), or in the given ``layers``. Everything that can be refused is refused, in one
    line, before the scores are measured and before anything is written. ``score`` None: alignment
    with ``run`` (all a run holds), restore with ``data`` (it chose better on the demo)."""
    if pick not in PICKS:
        raise HybridizeError(f"--pick {pick!r}: expected one of {', '.join(PICKS)}")
    if score is None:
        score = "alignment" if run is not None else "restore"
    if score not in SCORES:
        raise HybridizeError(f"--score {score!r}: expected one of {', '.join(SCORES)}")
    if score == "restore" and run is not None:
        raise HybridizeError("--score restore is measured here on --data (a stage-1 run holds alignment "
                             "losses only); give --data FILE instead of --run")
    if keep is not None and layers is not None:
        raise HybridizeError("give --keep K or --layers I,J, not both")
    if keep is None and layers is None:
        raise HybridizeError("give --keep K (with --run or --data to score the layers) or --layers I,J")
    if run is not None and data is not None:
        raise HybridizeError("give --run or --data to score the layers, not both")
    if layers is None and run is None and data is None:
        raise HybridizeError(f"--keep {keep} needs scores to choose by: give --run RUN_DIR (a stage-1 run "
                             "with --validation-fraction) or --data FILE (measured here), or name the layers "
                             "with --layers I,J")
    if keep is not None and keep < 0:
        raise HybridizeError(f"--keep {keep} must not be negative")
    out = Path(out_dir)
    _check_out(out, overwrite, ("--student", student_dir), ("--teacher", teacher_dir), ("--run", run))

    student = open_student_tensors(student_dir, "--student")
    config: RwkvHybridConfig = student.config
    teacher = _open_teacher(teacher_dir, config)
    n_layers = config.num_hidden_layers
    candidates = [i for i in range(n_layers) if config.is_wkv_layer(i)]
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise HybridizeError(f"--layers {bad}: not layers of this {n_layers}-layer model "
                                 f"(0..{n_layers - 1})")
        bad = [i for i in layers if i not in candidates]
        if bad:
            raise HybridizeError(f"--layers {bad}: already attention layers in this student (its time-mixing "
                                 f"layers are {candidates})")
        chosen = sorted(set(layers))
        keep = len(chosen)
    elif keep > len(candidates):
        raise HybridizeError(f"--keep {keep}: the student has only {len(candidates)} time-mixing layers "
                             f"({candidates})")

    scores = None
    if run is not None:
        scores = scores_from_run(run)
        missing = [i for i in candidates if i not in scores.scores]
        if missing:
            raise HybridizeError(f"--run {run} has no score for the student's time-mixing layer(s) {missing} "
                                 f"(it scores layers {sorted(scores.scores)}): was it a stage-1 run of this "
                                 "student?")
    elif data is not None:
        measure = (measure_restore_gains if score == "restore"
                   else functools.partial(measure_scores, loss=loss))
        with quiet_transformers():
            scores = measure(teacher_dir, student_dir, data, rows=rows, seq_len=seq_len,
                             batch_size=batch_size, validation_fraction=validation_fraction, seed=seed,
                             device=device)
    if layers is None:
        chosen = choose_layers(scores.scores, candidates, keep, pick)

    new_wkv = [i for i in candidates if i not in chosen]
    report = {
        "teacher": str(teacher_dir),
        "student": str(student_dir),
        "source": scores.source if scores is not None else {"kind": "layers"},
        # scores of the student's time-mixing layers (a run may also score layers already attention)
        "scores": {str(i): scores.scores[i] for i in candidates} if scores is not None else None,
        "score": score if scores is not None else None,
        "pick": pick if layers is None else "given",
        "keep": keep,
        "chosen": chosen,
        "wkv_layers_before": candidates,
        "wkv_layers": new_wkv,
        "attention_layers": [i for i in range(n_layers) if i not in new_wkv],
    }
    path = write_hybrid(teacher, student, out, chosen, report)
    return HybridizeResult(path, report)


def write_hybrid(teacher: SafetensorsCheckpoint, student: SafetensorsCheckpoint, out: Path, chosen: list[int],
                 report: dict) -> Path:
    """OUT: the student's config with ``chosen`` layers no longer time mixing, its tensors but in
    ``chosen``, the teacher's attention tensors there (in the student's dtype), the student's
    tokenizer/generation files, the model code, and ``report`` as hybridize.json."""
    from ..models.modeling_rwkv_hybrid import RwkvHybridForCausalLM

    config = copy.deepcopy(student.config)
    wkv_layers = [i for i in range(config.num_hidden_layers)
                  if student.config.is_wkv_layer(i) and i not in chosen]
    if wkv_layers == list(range(config.num_hidden_layers)):
        wkv_layers = student.config.wkv_layers  # nothing changed: keep None as None
    config.set_wkv_layers(wkv_layers)
    dtype = student.dtype("model.embed_tokens.weight")  # the student's own: its tensors stay bit for bit
    config.dtype = torch_dtype_name(dtype)
    with torch.device("meta"):  # names and shapes only; the values come from the checkpoints
        model = RwkvHybridForCausalLM(config).to(dtype)  # save_pretrained writes the model's dtype
    prefixes = tuple(f"model.layers.{i}.self_attn." for i in chosen)
    for prefix in prefixes:  # every teacher tensor of a chosen attention, and only those, is used
        theirs = {n for n in teacher.names if n.startswith(prefix)}
        mine = {n for n in model.state_dict() if n.startswith(prefix)}
        if theirs != mine:
            raise HybridizeError(f"teacher's {prefix}* tensors {sorted(theirs)} are not what the student's "
                                 f"attention holds {sorted(mine)}")
    state = {}
    for name, meta in model.state_dict().items():
        if name.startswith(prefixes):
            tensor = teacher.get(name).to(dtype)
        elif name == "lm_head.weight" and name not in student.names and config.tie_word_embeddings:
            continue  # a tied student stores only the embedding; save_pretrained does the same
        else:
            tensor = student.get(name)
        if tensor.shape != meta.shape:
            raise HybridizeError(f"{name}: shape {tuple(tensor.shape)} in the checkpoint, "
                                 f"{tuple(meta.shape)} in the hybrid")
        state[name] = tensor.contiguous()

    with quiet_transformers(), atomic_directory(out) as tmp:
        model.save_pretrained(tmp, state_dict=state)
        # copyfile, not copy2: the copies get the umask's mode (as convert's do)
        for name in COPIED_FILES:
            if (student.path / name).is_file():
                shutil.copyfile(student.path / name, tmp / name)
        (tmp / REPORT).write_text(json.dumps({**report, "out": str(out)}, indent=2) + "\n")
    return out


def render_scores(report: dict) -> str:
    """The per-layer scores as a small table, and the layers chosen."""
    source = report["source"]
    chosen, before = set(report["chosen"]), report["wkv_layers_before"]
    scores = report["scores"]
    lines = []
    if scores is not None:
        if source["kind"] == "run":
            where = f"held-out, {source['run']}/metrics.jsonl at step {source['step']}"
        else:
            split = (f", validation split {source['validation_fraction']}"
                     if source.get("validation_fraction") else "")
            where = f"{source['rows']} rows of {source['seq_len']} tokens of {source['data']}{split}"
        if source["kind"] == "restore":
            lines += [f"drop of the student's KL(teacher || student) per token (now {source['kl']:.5f}) when "
                      f"only that layer gets attention back ({where}):", "  layer       gain"]
        else:
            lines += [f"alignment loss per layer ({where}):", "  layer       loss"]
        n_layers = len(report["wkv_layers"]) + len(report["attention_layers"])
        for i in range(n_layers):
            if i not in before:
                lines.append(f"  {i:5d}          -  attention (already)")
                continue
            mark = "  <- keeps attention" if i in chosen else ""
            lines.append(f"  {i:5d} {scores[str(i)]:10.5f}{mark}")
    how = "given by --layers" if report["pick"] == "given" else f"{report['pick']} {report['keep']}"
    lines.append(f"layers that get the teacher's attention ({how}): "
                 f"{', '.join(map(str, report['chosen'])) or 'none'}")
    lines.append(f"time-mixing layers now: {report['wkv_layers']}; "
                 f"attention layers: {report['attention_layers']}")
    return "\n".join(lines)
