"""Training curves of the GSoT gate modes on the project's sample, in the TGR head and in every layer.

    python -m benchmarks.gsot_curves --out DIR                 # the reference run: 200 epochs at lr 5e-3, τ = 0.4
    python -m benchmarks.gsot_curves --out DIR --epochs 40     # shorter
    python -m benchmarks.gsot_curves --out DIR --report-only   # rebuild table.md and the plot from records.jsonl

Each run is ``tgr train`` on the embedded demo Llama (4-bit base) and the sample's training questions (the
question-level split of ``tgr demo``), through the command's own functions (``tgr.cli.parse_training_args``,
``tgr.cli.cmd_train``), for each gate mode in {hard, straight_through, soft, none (``--no-gsot``)} and
each placement: the seed's head on the final hidden state ("head") or every decoder layer ("layers",
``--tgr-layers all``). The Trainer's log history gives the loss and the pruned fraction (rows with
t̄ < τ: ``gsot_pruned`` for the head, ``layer_gsot_pruned`` over all layers) at every logging step; the
held-out questions' MAP and MRR are scored in eval mode, where every gate is hard.

Writes ``records.jsonl`` (one run a line, appended as each run ends), ``table.md`` and ``gsot_curves.png``
(loss and pruned fraction against the step, every mode, both placements) into ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

GATE_MODES = ("hard", "straight_through", "soft", "none")
PLACEMENTS = ("head", "layers")
RESULTS = Path(__file__).parent / "results"
#: Logged points averaged for the "final" loss and pruned fraction: one logged point is the
#: mean of ``logging_steps`` steps, and a few of them smooth out the batch-to-batch noise.
FINAL_WINDOW = 5
#: The reference run: 200 epochs at lr 5e-3, τ = 0.4.
REFERENCE_EPOCHS = 200
PRUNED_KEY = {"head": "gsot_pruned", "layers": "layer_gsot_pruned"}
COLORS = {"hard": "tab:red", "straight_through": "tab:blue", "soft": "tab:green", "none": "tab:gray"}


def default_out(device: str) -> Path:
    """The results folder of a run on ``device`` today: ``results/gsot-curves-<cpu|cuda>-<date>``,
    named like every other run's (never an earlier run's folder, whose records a run replaces)."""
    kind = "cpu" if str(device).split(":")[0] == "cpu" else "cuda"
    return RESULTS / f"gsot-curves-{kind}-{datetime.date.today().isoformat()}"


def train_flags(placement: str, mode: str, *, epochs: float, lr: float, threshold: float, logging_steps: int,
                output: Path, device: str) -> list[str]:
    """The ``tgr train`` command line of one run."""
    flags = ["--output", str(output), "--overwrite", "--quiet", "--device", device, "--epochs", str(epochs),
             "--lr", str(lr), "--logging-steps", str(logging_steps), "--save-steps", "1000000",
             "--gsot-threshold", str(threshold)]
    flags += ["--no-gsot"] if mode == "none" else ["--gsot-mode", mode]
    if placement == "layers":
        flags += ["--tgr-layers", "all", "--tgr-mode", "layers"]
    return flags


def curve_from_log_history(log_history: list[dict], placement: str) -> list[dict]:
    """(step, epoch, loss, lm_loss, pruned) at every logging step of a Trainer's log history."""
    key = PRUNED_KEY[placement]
    return [{"step": e["step"], "epoch": round(e["epoch"], 4), "loss": e["loss"], "lm_loss": e.get("lm_loss"),
             "pruned": e.get(key, 0.0)} for e in log_history if "loss" in e]


def _mean_tail(values: list[float]) -> float:
    tail = values[-FINAL_WINDOW:]
    return sum(tail) / len(tail)


def run_one(placement: str, mode: str, train_rows, held_out, work: Path, **settings) -> dict:
    """Train one (placement, mode) and return its record."""
    from tgr.cli import _evaluate, _evaluate_tgr_model, cmd_train, parse_training_args

    output = work / f"{placement}-{mode}"
    args, training = parse_training_args("train", train_flags(placement, mode, output=output, **settings))
    start = time.time()
    trained = cmd_train(args, training, split_rows=train_rows)
    seconds = time.time() - start
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    curve = curve_from_log_history(history, placement)
    if not curve:  # every figure of the record is over the logged points
        raise SystemExit(f"gsot_curves: the {placement}-{mode} run logged no loss ({trained['summary']['steps']} "
                         f"steps, --logging-steps {settings['logging_steps']}): lower --logging-steps or train "
                         f"longer")
    model, tokenizer = trained["model"], trained["tokenizer"]
    try:
        if placement == "head":
            scores = _evaluate(model, tokenizer, held_out, batch_size=8)
            held = {"map": scores["tgr_head"]["map"], "mrr": scores["tgr_head"]["mrr"],
                    "base_map": scores["base_head"]["map"], "base_mrr": scores["base_head"]["mrr"]}
        else:
            scores = _evaluate_tgr_model(model, tokenizer, held_out, 8)
            held = {"map": scores["map"], "mrr": scores["mrr"]}
    except Exception as err:  # the ranking is a side result: a failure there must not lose the curve
        held = {"map": None, "mrr": None, "error": f"{type(err).__name__}: {err}"}
    return {
        "placement": placement, "mode": mode, "epochs": settings["epochs"], "lr": settings["lr"],
        "threshold": settings["threshold"], "gsot_width": None if mode == "none" else model.config.gsot_width,
        "steps": trained["summary"]["steps"], "seconds": round(seconds, 1),
        "train_loss": trained["summary"]["train_loss"],
        "final_loss": round(_mean_tail([p["loss"] for p in curve]), 4),
        "final_pruned": round(_mean_tail([p["pruned"] for p in curve]), 4),
        "mean_loss": round(sum(p["loss"] for p in curve) / len(curve), 4),
        "max_pruned": max(p["pruned"] for p in curve),
        "held_out": held, "curve": curve,
        "device": device_label(settings["device"]), "date": time.strftime("%Y-%m-%d"),
    }


def device_label(device: str) -> str:
    """The device the runs trained on, for the table: the GPU's name, or the CPU's."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()})"


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps_to_settle(record: dict, records: list[dict], tolerance: float = 0.05) -> int | None:
    """The first logged step from which the loss stays within ``tolerance`` of the no-GSoT run's
    loss at the same step, in the same placement (every run sees the same batches in the same
    order: same seed, same data); None when there is no such run or the loss never settles."""
    reference = next((r for r in records if r["placement"] == record["placement"] and r["mode"] == "none"), None)
    if reference is None:
        return None
    none_loss = {p["step"]: p["loss"] for p in reference["curve"]}
    settled = None
    for point in record["curve"]:
        if point["step"] in none_loss and point["loss"] <= none_loss[point["step"]] * (1 + tolerance):
            settled = point["step"] if settled is None else settled
        else:
            settled = None
    return settled


def write_table(records: list[dict], path: Path) -> None:
    """table.md: the final loss and pruned fraction and the held-out ranking of every run."""
    first = records[0]
    lines = [
        "# GSoT gate modes: training on the project's sample",
        "",
        f"`python -m benchmarks.gsot_curves`: `tgr train` on the embedded demo Llama (4-bit base) and the sample's "
        f"training questions, {first['epochs']:g} epochs at lr {first['lr']:g}, GSoT threshold {first['threshold']:g}, "
        f"gate width ε = {next((r['gsot_width'] for r in records if r['gsot_width']), 0.05):g}; "
        f"{first['device']}, {first['date']}. Final loss and pruned fraction: the mean of the last {FINAL_WINDOW} "
        f"logged points (each the mean of the logging interval's steps); pruned = fraction of rows with t̄ < τ "
        f"(the head's rows, or every TGR layer's). Held-out MAP/MRR: the sample's held-out questions, "
        f"scored in eval mode (every gate hard).",
        "",
        *([f"The reference run is {REFERENCE_EPOCHS} epochs; {first['epochs']:g} here, to fit 8 runs into "
           f"about 25 minutes of this shared 2-core CPU.", ""] if first["epochs"] != REFERENCE_EPOCHS else []),
        "Mean loss: over every logged point (the area under the curve: how fast a run gets there). Steps to "
        "settle: the first logged step from which the loss stays within 5% of the no-GSoT run's loss at the same "
        "step (every run sees the same batches in the same order); n/a: never.",
        "",
        "| placement | gate | first logged loss | mean loss | final loss | steps to settle | max pruned | final pruned "
        "| held-out MAP | held-out MRR | steps | s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        held = r["held_out"]
        ranking = ("n/a | n/a" if held["map"] is None else f"{held['map']:.4f} | {held['mrr']:.4f}")
        settle = steps_to_settle(r, records)
        mean_loss = sum(p["loss"] for p in r["curve"]) / len(r["curve"])
        lines.append(f"| {r['placement']} | {r['mode']} | {r['curve'][0]['loss']:.4f} | {mean_loss:.4f} | "
                     f"{r['final_loss']:.4f} | {'n/a' if settle is None else settle} | {r['max_pruned']:.4f} | "
                     f"{r['final_pruned']:.4f} | {ranking} | {r['steps']} | {r['seconds']:.0f} |")
    base = next((r["held_out"] for r in records if "base_map" in r["held_out"]), None)
    if base is not None:
        lines += ["", f"The base's own head on the same held-out questions: MAP {base['base_map']:.4f}, "
                      f"MRR {base['base_mrr']:.4f}."]
    lines += ["", "![loss and pruned fraction against the step](gsot_curves.png)", ""]
    path.write_text("\n".join(lines))


def write_plot(records: list[dict], path: Path) -> None:
    """One figure: loss (top) and pruned fraction (bottom) against the step, head (left) and layers (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placements = [p for p in PLACEMENTS if any(r["placement"] == p for r in records)]
    fig, axes = plt.subplots(2, len(placements), figsize=(6 * len(placements), 7), squeeze=False, sharex="col")
    for col, placement in enumerate(placements):
        for r in (r for r in records if r["placement"] == placement):
            steps = [p["step"] for p in r["curve"]]
            axes[0, col].plot(steps, [p["loss"] for p in r["curve"]], color=COLORS[r["mode"]], label=r["mode"], lw=1)
            axes[1, col].plot(steps, [p["pruned"] for p in r["curve"]], color=COLORS[r["mode"]], label=r["mode"],
                              lw=1)
        first = records[0]
        axes[0, col].set_title(f"{'TGR head' if placement == 'head' else 'every layer'} "
                               f"({first['epochs']:g} epochs, lr {first['lr']:g}, τ {first['threshold']:g})")
        axes[0, col].set_ylabel("training loss")
        axes[0, col].set_yscale("log")
        axes[1, col].set_ylabel("pruned fraction (t̄ < τ)")
        axes[1, col].set_xlabel("step")
        axes[0, col].legend(title="gate")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path) -> None:
    records = read_records(out / "records.jsonl")
    write_table(records, out / "table.md")
    write_plot(records, out / "gsot_curves.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gsot_curves", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results/gsot-curves-<cpu|cuda>-<today>)")
    parser.add_argument("--epochs", type=float, default=float(REFERENCE_EPOCHS),
                        help="epochs per run (default: 200, the reference run's)")
    parser.add_argument("--lr", type=float, default=5e-3, help="learning rate (default: 5e-3)")
    parser.add_argument("--threshold", type=float, default=0.4, help="GSoT threshold τ (default: 0.4)")
    parser.add_argument("--logging-steps", type=int, default=10, help="steps per logged point (default: 10)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--modes", nargs="+", choices=GATE_MODES, default=list(GATE_MODES))
    parser.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=list(PLACEMENTS))
    parser.add_argument("--report-only", action="store_true", help="rebuild table.md and the plot from records.jsonl")
    args = parser.parse_args(argv)
    if args.report_only:
        if args.out is None:
            parser.error("--report-only needs --out FOLDER (the run's folder)")
        report(args.out)
        return 0
    out = args.out or default_out(args.device)

    import logging

    from tgr.cli import _rows, _silence_import_warnings
    from tgr.data import split_by_question

    _silence_import_warnings()
    logging.getLogger("tgr").setLevel(logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "records.jsonl"
    records_path.write_text("")
    rows = _rows(argparse.Namespace(data=None), "train")
    train_rows, held_out = split_by_question(rows)
    settings = dict(epochs=args.epochs, lr=args.lr, threshold=args.threshold, logging_steps=args.logging_steps,
                    device=args.device)
    with tempfile.TemporaryDirectory(prefix="gsot-curves-") as work:
        for placement in args.placements:
            for mode in args.modes:
                record = run_one(placement, mode, train_rows, held_out, Path(work), **settings)
                with records_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"{placement:6s} {mode:16s} final loss {record['final_loss']:.4f}  pruned "
                      f"{record['final_pruned']:.4f}  held-out MAP {record['held_out']['map']}  "
                      f"({record['steps']} steps, {record['seconds']:.0f} s)", flush=True)
    report(out)
    print(f"wrote {records_path}, {out / 'table.md'}, {out / 'gsot_curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
