"""ascendfactory-cli: thin Typer commands. Logic lives in the modules they call.

Imports of torch / megatron / transformers happen inside the commands only, so `--help`
and `plan` stay fast.
"""

from __future__ import annotations

import logging
import sys

import typer

from ascendfactory import logs
from ascendfactory.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune and pretrain LLMs on megatron-core: preprocess, convert, train, export in one command.",
)
convert_app = typer.Typer(no_args_is_help=True, help="HF <-> Megatron weight conversion with TP/PP sharding.")
app.add_typer(convert_app, name="convert")

_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors (anywhere on the line).")):
    """(--debug is taken out of the arguments by main(), so it also works after the command.)"""


@app.command(context_settings=_PASSTHROUGH)
def train(
    ctx: typer.Context,
    cfgs_yaml: str = typer.Argument(..., help="experiment YAML file"),
    model_name: str = typer.Argument(..., help="model block, e.g. qwen2-7b"),
    exp_name: str = typer.Argument(..., help="experiment block, e.g. 4096-sft-full"),
    master_addr: str | None = typer.Option(None, "--master_addr", "--master-addr"),
    num_nodes: int | None = typer.Option(None, "--num_nodes", "--num-nodes"),
    rank: int | None = typer.Option(None, "--rank", "--node_rank", "--node-rank"),
):
    """Resolve and validate the experiment, write exp-config.yaml, run the pipeline."""
    from ascendfactory.pipeline import run_train

    run_train(cfgs_yaml, model_name, exp_name, ctx.args, _flags(master_addr, num_nodes, rank))


@app.command(context_settings=_PASSTHROUGH)
def plan(
    ctx: typer.Context,
    cfgs_yaml: str = typer.Argument(...),
    model_name: str = typer.Argument(...),
    exp_name: str = typer.Argument(...),
    master_addr: str | None = typer.Option(None, "--master_addr", "--master-addr"),
    num_nodes: int | None = typer.Option(None, "--num_nodes", "--num-nodes"),
    rank: int | None = typer.Option(None, "--rank", "--node_rank", "--node-rank"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Resolve + validate + show what `train` would do. Runs nothing, writes nothing."""
    from ascendfactory.pipeline import show_plan

    show_plan(cfgs_yaml, model_name, exp_name, ctx.args, _flags(master_addr, num_nodes, rank), as_json)


@app.command("list")
def list_(cfgs_yaml: str = typer.Argument(...)):
    """Model names and, under each, its experiment names."""
    from ascendfactory.config.loader import list_experiments

    for model, exps in list_experiments(cfgs_yaml).items():
        typer.echo(model)
        for exp in exps:
            typer.echo(f"  {exp}")


@app.command()
def preprocess(
    input: str = typer.Option(..., "--input", help="file or folder: json, jsonl, parquet, csv, arrow, txt"),
    tokenizer_name_or_path: str = typer.Option(..., "--tokenizer-name-or-path"),
    output_prefix: str = typer.Option(..., "--output-prefix"),
    handler_name: str = typer.Option("GeneralPretrainHandler", "--handler-name"),
    prompt_type: str = typer.Option("auto", "--prompt-type"),
    seq_length: int = typer.Option(4096, "--seq-length"),
    pack: bool = typer.Option(False, "--pack"),
    append_eod: bool = typer.Option(False, "--append-eod"),
    json_keys: list[str] = typer.Option(["text"], "--json-keys"),
    map_keys: str | None = typer.Option(None, "--map-keys", help="JSON mapping of column/role names"),
    workers: int = typer.Option(1, "--workers"),
    skip_bad_records: bool = typer.Option(False, "--skip-bad-records"),
    max_record_mb: float = typer.Option(16, "--max-record-mb", help="a longer record is a bad record"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing outputs of --output-prefix"),
):
    """Raw dataset -> Megatron indexed dataset (.bin/.idx)."""
    from ascendfactory.data.preprocess import preprocess_command

    preprocess_command(
        input=input,
        tokenizer_name_or_path=tokenizer_name_or_path,
        output_prefix=output_prefix,
        handler_name=handler_name,
        prompt_type=prompt_type,
        seq_length=seq_length,
        pack=pack,
        append_eod=append_eod,
        json_keys=json_keys,
        map_keys=map_keys,
        workers=workers,
        skip_bad_records=skip_bad_records,
        max_record_mb=max_record_mb,
        overwrite=overwrite,
    )


@convert_app.command("hf2mg")
def convert_hf2mg(
    hf_dir: str = typer.Option(..., "--hf-dir"),
    mg_dir: str = typer.Option(..., "--mg-dir"),
    tp: int = typer.Option(1, "--tp"),
    pp: int = typer.Option(1, "--pp"),
    ep: int = typer.Option(1, "--ep", help="expert parallel size (MoE): each EP rank holds num_experts / EP"),
    num_layer_list: str | None = typer.Option(None, "--num-layer-list",
                                                 help="layers per PP stage, e.g. 6,10 (default: even split)"),
    dtype: str | None = typer.Option(None, "--dtype", help="bf16|fp16|fp32 (default: the HF dtype)"),
    make_vocab_size_divisible_by: int | None = typer.Option(
        None, "--make-vocab-size-divisible-by", help="pad the vocab with zero rows to a multiple of N x TP"),
    verify: bool = typer.Option(False, "--verify", help="compare HF and megatron-core logits afterwards (CPU)"),
):
    """HF safetensors -> Megatron TP/PP(/EP) shards."""
    from ascendfactory.convert.api import hf2mg_command

    hf2mg_command(hf_dir=hf_dir, mg_dir=mg_dir, tp=tp, pp=pp, num_layer_list=num_layer_list, dtype=dtype,
                  make_vocab_size_divisible_by=make_vocab_size_divisible_by, verify=verify, ep=ep)


@convert_app.command("mg2hf")
def convert_mg2hf(
    mg_dir: str = typer.Option(..., "--mg-dir"),
    hf_dir: str = typer.Option(..., "--hf-dir"),
    hf_config_dir: str = typer.Option(..., "--hf-config-dir"),
    iteration: int | None = typer.Option(None, "--iteration", help="default: the tracker's iteration"),
    dtype: str | None = typer.Option(None, "--dtype", help="bf16|fp16|fp32 (default: the checkpoint's)"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="largest safetensors file, e.g. 5GB, 500MB"),
    verify: bool = typer.Option(False, "--verify", help="compare HF and megatron-core logits afterwards (CPU)"),
    peft_dir: str | None = typer.Option(None, "--peft-dir",
                                           help="a LoRA checkpoint's adapters, also as a PEFT adapter folder here"),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint",
                                          help="load types beyond tensors and Megatron args: runs code from the files"),
):
    """Megatron checkpoint (any TP/PP/EP) -> HF safetensors (LoRA adapters folded in)."""
    from ascendfactory.ckpt.reader import trust_checkpoints
    from ascendfactory.convert.api import mg2hf_command

    trust_checkpoints(trust_checkpoint)

    mg2hf_command(mg_dir=mg_dir, hf_dir=hf_dir, hf_config_dir=hf_config_dir, iteration=iteration, dtype=dtype,
                  shard_size=shard_size, verify=verify, peft_dir=peft_dir)


@convert_app.command("reshard")
def convert_reshard(
    mg_dir: str = typer.Option(..., "--mg-dir", help="a Megatron checkpoint, legacy or torch_dist (any layout)"),
    out_dir: str = typer.Option(..., "--out-dir"),
    tp: int = typer.Option(1, "--tp"),
    pp: int = typer.Option(1, "--pp"),
    ep: int = typer.Option(1, "--ep", help="expert parallel size (MoE)"),
    num_layer_list: str | None = typer.Option(None, "--num-layer-list",
                                                 help="layers per PP stage, e.g. 6,10 (default: even split)"),
    ckpt_format: str = typer.Option("legacy", "--ckpt-format", help="legacy|torch_dist"),
    iteration: int | None = typer.Option(None, "--iteration", help="default: the tracker's iteration"),
    hf_config_dir: str | None = typer.Option(None, "--hf-config-dir",
                                                help="the model's config.json (default: its args' source model)"),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint",
                                          help="load types beyond tensors and Megatron args: runs code from the files"),
    weights_only: bool = typer.Option(False, "--weights-only",
                                      help="a training checkpoint's weights alone (default: in full, resumable)"),
):
    """Megatron checkpoint -> the same checkpoint at another TP/PP/EP and/or format: a training checkpoint in full
    (optimizer, scheduler, iteration; resume it with ckpt_load_type 2), converted weights as weights."""
    from ascendfactory.ckpt.reader import trust_checkpoints
    from ascendfactory.convert.reshard import reshard

    trust_checkpoints(trust_checkpoint)
    reshard(mg_dir, out_dir, tp, pp, ep, num_layer_list, ckpt_format, hf_config_dir, iteration,
            weights_only=weights_only)


def _flags(master_addr, num_nodes, rank) -> dict:
    return {"master_addr": master_addr, "num_nodes": num_nodes, "rank": rank}


def main(argv: list[str] | None = None) -> None:
    logs.setup()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        app(args=argv)  # click's standalone mode: usage errors exit 2, then sys.exit(0) on success
    except UserError as e:
        if debug:
            raise
        logging.getLogger(__name__).error(str(e) or "error")
        sys.exit(e.exit_code)
