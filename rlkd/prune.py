"""`python -m rlkd.prune`: a student cut from the teacher (the Minitron / DistilBERT / ShortGPT workflow).

    python -m rlkd.prune --model TEACHER_DIR --out STUDENT_DIR [--layers N | --keep-layers 0,2]
                         [--mlp-ratio 0.5] [--head-ratio 0.5] [--data FILE.jsonl] [--calib-rows 128]

Importance is measured on calibration text (`--data`, rlkd's JSONL rows; default the shipped Dolly subset):
- depth (`--depth-metric loss`, the default): how much the calibration loss rises when the layer alone is
  skipped (Minitron's drop-one-layer importance); or (`influence`) its block influence, 1 − cos(h_in, h_out)
  averaged over the tokens (ShortGPT), which needs no extra forwards. The `--layers` most important layers are
  kept, in their order; `--keep-layers` names them instead. On the skills teacher the loss metric keeps
  layers 0 and 2 (13.3% greedy exact match before any training), block influence 0 and 3 (11.1%);
- width: an MLP channel's mean |act(gate)·up| over the tokens (Minitron's activation importance); every kept
  layer keeps its `--mlp-ratio` most active channels; and a key/value head group's (one KV head and the query
  heads that share it) summed mean norm of its heads' contributions to the residual stream (W_o[:, h]·x_h):
  every kept layer keeps its `--head-ratio` most active groups, so grouped-query attention stays grouped.
Works for Llama-style decoders (Llama, Qwen2, Mistral: `model.layers`, `mlp.gate_proj/up_proj/down_proj`).
Writes an HF model directory (safetensors, the teacher's tokenizer) and `prune.json` with the scores and
what was kept, so the cut is reproducible and explained.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from rlkd.config import ConfigError

CALIBRATION_TOKENS = 96  # per row: the suites' prompts and answers are short


def calibration_batches(tok, examples, batch_size: int = 16) -> list:
    """rlkd's own prompt/response packing (SequenceBatch), as the models were trained: the loss below is the
    gold responses' cross-entropy, never the prompts' (a model trained on answers need not predict prompts)."""
    from rlkd.batch import SequenceBatch
    from rlkd.data import tokenize

    rows = tokenize(examples, tok, CALIBRATION_TOKENS, CALIBRATION_TOKENS)
    return [SequenceBatch.collate([r.prompt_ids for r in rows[i:i + batch_size]],
                                  [r.response_ids for r in rows[i:i + batch_size]], tok.pad_token_id)
            for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def calibration_loss(model, batches: list) -> float:
    """Mean cross-entropy of the gold response tokens (rlkd.forward, as the learners compute it)."""
    from rlkd.forward import response_forward, token_logprobs

    total, count = 0.0, 0.0
    for b in batches:
        logits, _ = response_forward(model, b, model.config.vocab_size)
        total -= (token_logprobs(logits, b.responses) * b.response_mask).sum().item()
        count += b.response_mask.sum().item()
    return total / max(count, 1)


@torch.no_grad()
def drop_one_loss(model, batches: list) -> list[float]:
    """Per layer: the calibration loss with that layer skipped, minus the full model's."""
    layers, base = model.model.layers, calibration_loss(model, batches)
    rises = []
    try:
        for i in range(len(layers)):
            model.model.layers = torch.nn.ModuleList([m for j, m in enumerate(layers) if j != i])
            rises.append(calibration_loss(model, batches) - base)
    finally:
        model.model.layers = layers
    return rises


@torch.no_grad()
def importance(model, batches: list) -> tuple[list[float], list[torch.Tensor], list[torch.Tensor]]:
    """(block influence per layer, mean |MLP activation| per channel per layer, mean output norm per attention
    head per layer) over the unpadded tokens."""
    layers = model.model.layers
    influence, channels = torch.zeros(len(layers)), [torch.zeros(0) for _ in layers]
    heads = [torch.zeros(0) for _ in layers]
    tokens, mask = 0, None
    hooks = []

    def on_layer(i):
        def hook(module, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            influence[i] += ((1 - cos) * mask).sum()
        return hook

    def on_down(i):
        def hook(module, args):
            act = (args[0].float().abs() * mask.unsqueeze(-1)).sum((0, 1))
            channels[i] = act if channels[i].numel() == 0 else channels[i] + act
        return hook

    def on_o_proj(i, head_dim):
        def hook(module, args):  # o_proj's input: the heads' outputs side by side, (B, T, H * head_dim)
            x, w = args[0].float(), module.weight.float()
            # each head's contribution to the residual stream, W_o[:, h] x_h: one head at a time, (B, T, hidden)
            norm = torch.stack([((x[..., h:h + head_dim] @ w[:, h:h + head_dim].T).norm(dim=-1) * mask).sum()
                                for h in range(0, x.shape[-1], head_dim)])
            heads[i] = norm if heads[i].numel() == 0 else heads[i] + norm
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(on_layer(i), with_kwargs=True))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i, layer.self_attn.head_dim)))
    try:
        for b in batches:
            mask = b.attention_mask.float()
            tokens += mask.sum().item()
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                  use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return (influence / tokens).tolist(), [c / tokens for c in channels], [h / tokens for h in heads]


def _sliced(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A copy of `linear` keeping rows (dim 0: outputs) or columns (dim 1: inputs) `index`."""
    weight = linear.weight.index_select(dim, index)
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                          dtype=weight.dtype, device=weight.device)
    out.weight.data.copy_(weight)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias if dim == 1 else linear.bias.index_select(0, index))
    return out


def _narrow_heads(attn, head_scores: torch.Tensor, groups: int) -> list[int]:
    """Keep the `groups` KV head groups of `attn` with the largest summed head scores; returns their ids."""
    per_group = attn.num_key_value_groups  # query heads per KV head
    kept = head_scores.view(-1, per_group).sum(-1).topk(groups).indices.sort().values
    d = attn.head_dim
    kv = torch.cat([torch.arange(g * d, (g + 1) * d) for g in kept.tolist()])
    q = torch.cat([torch.arange(h * d, (h + 1) * d) for g in kept.tolist()
                   for h in range(g * per_group, (g + 1) * per_group)])
    attn.q_proj, attn.o_proj = _sliced(attn.q_proj, q, 0), _sliced(attn.o_proj, q, 1)
    attn.k_proj, attn.v_proj = _sliced(attn.k_proj, kv, 0), _sliced(attn.v_proj, kv, 0)
    return kept.tolist()


def prune(model, keep_layers: list[int], channel_scores: list[torch.Tensor] | None, mlp_ratio: float,
          head_scores: list[torch.Tensor] | None = None, head_ratio: float = 1.0) -> dict:
    """Cut `model` in place to `keep_layers` (in order) and, if mlp_ratio < 1, to the most active MLP
    channels of each, and if head_ratio < 1, to the most active KV head groups of each; returns what was kept."""
    layers, config = model.model.layers, model.config
    width = config.intermediate_size if mlp_ratio >= 1 else max(1, round(config.intermediate_size * mlp_ratio))
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    groups = kv_heads if head_ratio >= 1 else max(1, round(kv_heads * head_ratio))
    kept, kept_groups = torch.nn.ModuleList(), []
    for new_index, old in enumerate(keep_layers):
        layer = layers[old]
        layer.self_attn.layer_idx = new_index  # the KV cache is indexed by it
        if width < config.intermediate_size:
            index = channel_scores[old].topk(width).indices.sort().values
            mlp = layer.mlp
            mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, index, 0), _sliced(mlp.up_proj, index, 0)
            mlp.down_proj = _sliced(mlp.down_proj, index, 1)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = width
        if groups < kv_heads:
            kept_groups.append(_narrow_heads(layer.self_attn, head_scores[old], groups))
        kept.append(layer)
    model.model.layers = kept
    config.num_hidden_layers, config.intermediate_size = len(kept), width
    if groups < kv_heads:  # head_dim stays: written out, since hidden_size / heads no longer gives it
        config.head_dim = kept[0].self_attn.head_dim
        config.num_attention_heads = groups * (config.num_attention_heads // kv_heads)
        config.num_key_value_heads = groups
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (Qwen2, Mistral)
        config.layer_types = [config.layer_types[i] for i in keep_layers]
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = min(config.max_window_layers, len(kept))
    return {"kept_layers": keep_layers, "intermediate_size": width, "kv_heads": groups,
            "kept_head_groups": kept_groups}


def choose_layers(scores: list[float], layers: int | None, keep: str | None, field: str = "--layers") -> list[int]:
    n = len(scores)
    if keep:
        try:
            chosen = sorted({int(x) for x in keep.split(",") if x.strip()})
        except ValueError:
            raise ConfigError(f"--keep-layers={keep!r} is invalid: comma-separated layer indices") from None
        if not chosen or chosen[0] < 0 or chosen[-1] >= n:
            raise ConfigError(f"--keep-layers={keep!r} is invalid: indices in [0, {n - 1}]")
        return chosen
    layers = n if layers is None else layers
    if not 1 <= layers <= n:
        raise ConfigError(f"{field}={layers} is invalid: between 1 and the model's {n} layers")
    return sorted(sorted(range(n), key=lambda i: -scores[i])[:layers])


def cached_pruned_student(cfg, teacher_dir: Path, examples: list, log=print) -> Path:
    """`model.prune_layers`: the teacher cut by prune_dir on up to 128 labelled rows, cached under model.cache_dir
    (keyed by the teacher's weight files, the rows and the cut), so a second run reuses it."""
    import hashlib

    from rlkd.models import build_cached

    m, rows = cfg.model, examples[:128]
    heads = {"heads": m.prune_head_ratio} if m.prune_head_ratio < 1 else {}  # earlier cuts keep their keys
    key = hashlib.sha256(json.dumps({"layers": m.prune_layers, "mlp": m.prune_mlp_ratio, "v": 1, **heads,
                                     "rows": [[e.prompt, e.references[0]] for e in rows]}).encode())
    for f in sorted(Path(teacher_dir).glob("*.safetensors")):  # size and mtime: a 70B teacher is not re-read
        key.update(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    root = Path(m.cache_dir).expanduser() / f"pruned-student-{key.hexdigest()[:12]}"
    return build_cached(root, lambda tmp: prune_dir(teacher_dir, tmp, rows, m.prune_layers, None, "loss",
                                                    m.prune_mlp_ratio, log, ("model.teacher", "model.prune_layers"),
                                                    m.prune_head_ratio),
                        log)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m rlkd.prune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF decoder directory to cut (the teacher)")
    ap.add_argument("--out", required=True, help="new directory for the pruned model (must not exist)")
    ap.add_argument("--layers", type=int, help="keep this many layers, the most important ones")
    ap.add_argument("--keep-layers", help="keep exactly these layers, e.g. 0,2 (instead of --layers)")
    ap.add_argument("--depth-metric", default="loss", choices=["loss", "influence"],
                    help="layer importance: the loss rise when it is skipped, or its block influence")
    ap.add_argument("--mlp-ratio", type=float, default=1.0, help="fraction of MLP channels each layer keeps")
    ap.add_argument("--head-ratio", type=float, default=1.0,
                    help="fraction of key/value head groups each layer keeps (with their query heads)")
    ap.add_argument("--data", help="calibration rows, rlkd JSONL (default: the shipped Dolly subset)")
    ap.add_argument("--calib-rows", type=int, default=128, help="calibration rows used")
    args = ap.parse_args(argv)
    if args.layers is not None and args.keep_layers:
        raise ConfigError("--layers and --keep-layers exclude each other")
    for flag, value in (("--mlp-ratio", args.mlp_ratio), ("--head-ratio", args.head_ratio)):
        if not 0 < value <= 1:
            raise ConfigError(f"{flag}={value} is invalid: in (0, 1]")
    if args.calib_rows < 1:
        raise ConfigError(f"--calib-rows={args.calib_rows} is invalid: an integer >= 1")
    if Path(args.out).exists():
        raise ConfigError(f"--out={args.out!r} is invalid: it exists; give a new directory")
    return args


def run_cli(args, log=print) -> dict:
    from rlkd.data import SHIPPED_DOLLY, read_examples
    from rlkd.models import check_model_dir

    model_dir = check_model_dir(args.model, "--model")
    examples, report = read_examples(args.data or SHIPPED_DOLLY, args.calib_rows)
    log(report.summary())
    return prune_dir(model_dir, Path(args.out), examples, args.layers, args.keep_layers, args.depth_metric,
                     args.mlp_ratio, log, head_ratio=args.head_ratio)


def prune_dir(model_dir: Path, out: Path, examples: list, layers: int | None, keep_layers: str | None = None,
              depth_metric: str = "loss", mlp_ratio: float = 1.0, log=print,
              fields: tuple[str, str] = ("--model", "--layers"), head_ratio: float = 1.0) -> dict:
    """Cut the HF decoder in `model_dir` by importance on `examples` and write it to `out` (with its tokenizer
    and prune.json). Used by the CLI and by runs that name `model.prune_layers`."""
    from rlkd.models import load_model, load_tokenizer

    tok, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    decoder_layers = getattr(getattr(model, "model", None), "layers", None)
    if decoder_layers is None or not all(hasattr(getattr(x, "mlp", None), "down_proj") for x in decoder_layers):
        raise ConfigError(f"{fields[0]}={str(model_dir)!r} is invalid: rlkd.prune cuts Llama-style decoders "
                          f"(model.layers[i].mlp.gate_proj/up_proj/down_proj), not {type(model).__name__}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batches = calibration_batches(tok, examples)
    influence, channels, heads = importance(model, batches)
    scores = drop_one_loss(model, batches) if depth_metric == "loss" else influence
    keep = choose_layers(scores, layers, keep_layers, fields[1])
    before = sum(p.numel() for p in model.parameters())
    summary = prune(model, keep, channels, mlp_ratio, heads, head_ratio)
    after = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(out))
    load_tokenizer(model_dir).save_pretrained(str(out))
    summary.update(source=str(model_dir), depth_metric=depth_metric, layer_scores=scores,
                   block_influence=influence, calibration_rows=len(examples),
                   mlp_ratio=mlp_ratio, head_ratio=head_ratio, parameters_before=before, parameters_after=after)
    (Path(out) / "prune.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"layer importance ({depth_metric}): {[round(s, 4) for s in scores]}; kept layers {keep}, "
        f"MLP width {summary['intermediate_size']}, {summary['kv_heads']} KV heads; "
        f"{before / 1e6:.2f}M -> {after / 1e6:.2f}M parameters -> {out}")
    return summary


def main(argv=None) -> int:
    from rlkd.data import DataError

    try:
        run_cli(parse_args(argv))
    except (ConfigError, DataError) as e:
        print(f"rlkd.prune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
