"""bench.json -> bench.md (tables) and bench.png (bar plots of the ratios and of the 7B memory estimate)."""

from __future__ import annotations

from pathlib import Path

RATIO_LABELS = {
    "chat_latency_ratio": "grounded chat / plain LLaVA generate (latency)",
    "train_step_ratio": "grounded train step / plain LoRA LLaVA step (time)",
    "ground_step_ratio": "the same, detector frozen as in the default recipe's `ground` stage (time)",
    "det_head_vs_yolov8n": "our Detect head / YOLOv8n (mAP50-95, same budget)",
}


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def markdown(report: dict) -> str:
    machine, runs = report["machine"], report["benchmarks"]
    lines = [
        f"# grounded-llava benchmarks ({'quick' if report['quick'] else 'full'} run)",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
        f"load average {_number(machine['load_average_1m'])} at start; torch {machine['torch']}, "
        f"transformers {machine['transformers']}, peft {machine['peft']}, ultralytics {machine['ultralytics']}.",
        "",
        "| ratio | value | what |",
        "| --- | --- | --- |",
    ]
    lines += [f"| `{k}` | {_number(report['ratios'][k])} | {label} |" for k, label in RATIO_LABELS.items()]
    latency, step, ground = runs["chat_latency"], runs["train_step"], runs["ground_step"]
    lines += [
        "",
        "| timing (median of interleaved repeats) | grounded | plain | repeats |",
        "| --- | --- | --- | --- |",
        f"| chat, {latency['new_tokens']} new tokens (s) | {latency['median_s']['grounded_chat']:.4f} | "
        f"{latency['median_s']['plain_generate']:.4f} | {latency['repeats']} |",
        f"| chat throughput (new tokens/s, whole turn) | {latency['tokens_per_s']['grounded_chat']:.1f} | "
        f"{latency['tokens_per_s']['plain_generate']:.1f} | |",
        f"| train step, batch {step['batch_size']} x {step['sequence_length']} tokens (s) | "
        f"{step['median_s']['grounded_step']:.4f} | {step['median_s']['plain_lora_step']:.4f} | {step['repeats']} |",
        f"| the same, detector frozen (s) | {ground['median_s']['grounded_step']:.4f} | "
        f"{ground['median_s']['plain_lora_step']:.4f} | {ground['repeats']} |",
    ]
    det = runs["det_head_vs_yolov8n"]
    lines += [
        "",
        f"| detector (budget {det['budget_s']:.0f} s, {det['train_images']} train / {det['val_images']} val images)"
        " | mAP50-95 | mAP50 | training s | what it did |",
        "| --- | --- | --- | --- | --- |",
        f"| ours (Trainer `heads` stage) | {det['map50_95']['ours']:.4f} | {det['map50']['ours']:.4f} | "
        f"{det['train_s']['ours']:.0f} | {det['ours_steps']} steps x {det['ours_batch_size']} |",
        f"| YOLOv8n (from yolov8n.yaml) | {det['map50_95']['yolov8n']:.4f} | {det['map50']['yolov8n']:.4f} | "
        f"{det['train_s']['yolov8n']:.0f} | {det['yolov8n_batches']} batches x {det['yolov8n_batch_size']} "
        f"({det['yolov8n_epochs']} epochs) |",
    ]
    rss = runs["peak_rss"]
    lines += [
        "",
        "| peak RSS (fresh process) | MB |",
        "| --- | --- |",
        f"| imports only | {rss['import_mb']:.0f} |",
        f"| tiny-preset training, {rss['train']['steps']} steps x batch {rss['train']['batch_size']} | "
        f"{rss['train_mb']:.0f} |",
        f"| tiny-preset `chat`, {rss['chat']['new_tokens']} new tokens | {rss['chat_mb']:.0f} |",
    ]
    estimate = runs["llava15_7b_estimate"]
    params, memory = estimate["parameters"], estimate["memory_gib"]
    lines += ["", f"| 7B estimate ({estimate['config']}) | value |", "| --- | --- |"]
    lines += [f"| parameters: {k} | {v / 1e6:,.1f} M |" for k, v in params.items()]
    lines += [f"| memory: {k} | {v:.2f} GiB |" for k, v in memory.items()]
    return "\n".join(lines) + "\n"


def bar_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = {k: v for k, v in report["ratios"].items() if v is not None}
    memory = report["benchmarks"]["llava15_7b_estimate"]["memory_gib"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    bars = left.bar(
        range(len(ratios)),
        list(ratios.values()),
        color=["#4878cf", "#6acc65", "#8fd18a", "#d65f5f"][: len(ratios)],
    )
    left.bar_label(bars, fmt="%.2f")
    left.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    left.set_xticks(range(len(ratios)), [k.replace("_", "\n", 2) for k in ratios], fontsize=8)
    left.set_ylabel("ratio (grounded / baseline)")
    left.set_title("ratios" + (" (quick run)" if report["quick"] else ""))
    names = list(memory)
    bars = right.barh(range(len(names)), [memory[n] for n in names], color="#956cb4")
    right.bar_label(bars, fmt="%.2f", fontsize=8)
    right.set_yticks(range(len(names)), names, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("GiB")
    right.set_title("llava-1.5-7b grounded: memory estimate (analytic)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
