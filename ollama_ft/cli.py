"""The `ollama-ft` command line. Thin: parse, call one function, print. Heavy libraries (torch,
transformers, llama_cpp) are imported inside the called functions so `--help` stays instant.

User mistakes raise `UserError` -> one red line, a hint, exit 1. `--verbose` shows tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .core.errors import UserError

app = typer.Typer(
    name="ollama-ft",
    help=(
        "Fine-tune a base model on your own data and run it in your local Ollama.\n\n"
        "Typical use:\n\n"
        "  ollama-ft train configs/demo.yaml        # pull, data, QLoRA, merge, GGUF, Modelfile, eval, register\n\n"
        "  ollama run demo                          # chat with the tuned model\n\n"
        "  ollama-ft publish demo --registry 127.0.0.1:5000/team\n\n"
        "Each stage is also a command of its own (pull, data, train, merge, export, modelfile,\n"
        "eval, register) and works on a run directory under runs/. `ollama-ft status RUN` shows\n"
        "which stages are done."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Validate, prepare and inspect a dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_state = {"verbose": False}

ConfigArg = Annotated[Path, typer.Argument(help="YAML config, e.g. configs/demo.yaml", show_default=False)]
RunArg = Annotated[str, typer.Argument(help="Run name (runs/<name>) or run directory", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value: section.key=value (repeatable)"),
]


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug output")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit")] = False,
) -> None:
    _state["verbose"] = verbose
    if verbose:
        os.environ["OLLAMA_FT_VERBOSE"] = "1"
    if version:
        from . import __version__

        typer.echo(f"ollama-ft {__version__}")
        raise typer.Exit(0)
    if "--help" not in sys.argv[1:]:
        _check_environment()


def _check_environment() -> None:
    """ollama-ft's own environment settings, checked before any work (not deep inside a stage)."""
    for var in ("OLLAMA_FT_PROOF_RAM_BYTES", "OLLAMA_FT_CONVERT_CHUNK_BYTES"):
        raw = os.environ.get(var)
        if raw and not (raw.strip().replace("_", "").isdigit() and int(raw.strip().replace("_", "")) > 0):
            raise UserError(f"{var}={raw!r} is not a positive whole number of bytes",
                            hint=f"write bytes, e.g. {var}=16000000000 for 16 GB, or unset it (`unset {var}`)")
    raw = os.environ.get("OLLAMA_FT_CACHE")
    if raw:
        p = Path(raw).expanduser()
        if p.exists() and not p.is_dir():
            raise UserError(f"OLLAMA_FT_CACHE={raw!r} is not a directory",
                            hint="point OLLAMA_FT_CACHE at a directory (it is created if missing), or unset it")
    if os.environ.get("OLLAMA_HOST", "").strip():
        # The ollama package parses $OLLAMA_HOST when it is imported, and raises a bare ValueError.
        from .ollama.api import resolve_host

        try:
            resolve_host(None)
        except UserError as e:
            raise UserError(f"OLLAMA_HOST: {e.message}", hint=e.hint or "unset OLLAMA_HOST to use "
                            "http://127.0.0.1:11434") from None


# ------------------------------------------------------------------------------------------
# Pipeline


@app.command()
def train(
    config: ConfigArg,
    set_: SetOpt = None,
    until: Annotated[str | None, typer.Option(help="Stop after this stage (pull, data, train, merge, export, modelfile, eval, register)")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="Redo from this stage on (earlier done stages are reused)")] = None,
    force: Annotated[list[str] | None, typer.Option(help="Redo this stage even if done (repeatable)")] = None,
    resume: Annotated[bool, typer.Option(help="Resume training from the newest checkpoint")] = True,
    nproc: Annotated[int | None, typer.Option(help="Training processes per node (torchrun)")] = None,
    name: Annotated[str | None, typer.Option(help="Model name in Ollama (default: ollama.name or the run name)")] = None,
    from_adapter: Annotated[str | None, typer.Option(
        help="Continue this earlier run's adapter (run name or runs/<run>) on this config's data")] = None,
    distributed: Annotated[str | None, typer.Option(help="ddp (a full copy per process) or fsdp (base sharded)")] = None,
    nnodes: Annotated[int | None, typer.Option(help="Machines taking part (torchrun --nnodes)")] = None,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="HOST:PORT every node meets at (torchrun rendezvous)")] = None,
    rdzv_id: Annotated[str | None, typer.Option(help="Job id shared by every node (default: the run name)")] = None,
    node_rank: Annotated[int | None, typer.Option(help="This node's rank (only with --rdzv-backend static)")] = None,
) -> None:
    """Run the whole pipeline: pull -> data -> train -> merge -> export -> modelfile -> eval -> register.

    Finished stages are skipped (their fingerprint matches), so re-running continues where it
    stopped. Without a reachable Ollama server it stops after the Modelfile and prints the
    `ollama create` command to register by hand.

    Continue last month's model on new data:  ollama-ft train new.yaml --from-adapter clinic-2026-11

    Two machines x 4 GPUs (same command on both):  --nproc 4 --nnodes 2 --rdzv-endpoint node1:29400
    """
    from .pipeline import run_pipeline

    overrides = list(set_ or [])
    if nproc:
        overrides.append(f"training.nproc={nproc}")
    for key, value in (("from_adapter", from_adapter), ("distributed", distributed), ("nnodes", nnodes),
                       ("rdzv_endpoint", rdzv_endpoint), ("rdzv_id", rdzv_id), ("node_rank", node_rank)):
        if value is not None:  # strings quoted: a run named 2026 or an endpoint like 1:29400 stay strings
            overrides.append(f"training.{key}={json.dumps(value) if isinstance(value, str) else value}")
    if name:
        overrides.append(f"ollama.name={name}")
    run_pipeline(config, overrides, until=until, from_stage=from_, force=list(force or []), resume=resume)


@app.command()
def pull(
    spec: Annotated[str, typer.Argument(help="deepseek-r1:7b | Qwen/Qwen2.5-7B-Instruct | ./dir | model.gguf | ollama://name | gemma3:270m")],
    out: Annotated[Path | None, typer.Option(help="Write the HF directory here (default: a cache dir)")] = None,
    revision: Annotated[str | None, typer.Option(help="HF revision (commit, tag or branch)")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the repo to run its own Python code")] = False,
    dry_run: Annotated[bool, typer.Option(help="Only report what would be pulled")] = False,
) -> None:
    """Fetch a base model and report architecture, size, licence, chat template and runtime support."""
    from .base.stage import pull_command

    pull_command(spec, out=out, revision=revision, trust_remote_code=trust_remote_code, dry_run=dry_run)


@data_app.command("validate")
def data_validate(
    path: Annotated[Path, typer.Argument(help="File or directory (jsonl, json, csv, parquet, txt)")],
    format: Annotated[str, typer.Option(help="auto | alpaca | sharegpt | messages | prompt_completion | text")] = "auto",
    show: Annotated[int, typer.Option(help="How many problems to list")] = 20,
    near_duplicates: Annotated[float | None, typer.Option(
        help="Also list near-duplicates (MinHash) at this Jaccard similarity, e.g. 0.85")] = None,
) -> None:
    """Check every record; list problems with file:line and field; exit 1 if any.

    Also reports what the data stage would do: duplicates (exact, and near with --near-duplicates),
    the category balance when records carry `category`, and timestamp coverage for `data.split: time`.
    """
    from .data.commands import validate_command

    validate_command(path, format=format, show=show, near_duplicates=near_duplicates)


@data_app.command("prepare")
def data_prepare(
    config: ConfigArg,
    set_: SetOpt = None,
) -> None:
    """Normalise, deduplicate, split, render with the chat template, mask, tokenize (the `data` stage)."""
    from .pipeline import run_pipeline

    run_pipeline(config, list(set_ or []), until="data")


@data_app.command("inspect")
def data_inspect(
    run: RunArg,
    n: Annotated[int, typer.Option(help="Examples to show")] = 3,
    split: Annotated[str, typer.Option(help="train | validation | test")] = "train",
) -> None:
    """Show rendered examples with the trained (assistant) tokens highlighted, after the data stage's
    findings (near-duplicates, perplexity outliers, category balance, time split, replay mix)."""
    from .data.commands import inspect_command

    inspect_command(run, n=n, split=split)


@app.command()
def plan(
    config: ConfigArg,
    budget: Annotated[str, typer.Option(help="GPU memory budget, e.g. 16GB")] = "16GB",
    set_: SetOpt = None,
    ram: Annotated[str | None, typer.Option(help="System RAM budget for merge/export, e.g. 16GB")] = None,
    device: Annotated[str, typer.Option(help="cuda: training on a GPU (--budget is its memory); cpu: on this "
                                             "machine (--budget is RAM; also estimates the time per step "
                                             "from a matmul measured now)")] = "cuda",
) -> None:
    """Predict peak memory for training, merge and export from the model config alone; go/no-go.

    On a 16 GB GPU:  ollama-ft plan configs/qwen2.5-7b.yaml --budget 16GB

    On this CPU:     ollama-ft plan configs/demo.yaml --device cpu --budget 8GB
    """
    from .train.plan_report import plan_command

    if device not in ("cuda", "cpu"):
        raise UserError(f"--device {device!r}: expected cuda or cpu", hint="cuda plans for a GPU, cpu for this machine")
    plan_command(config, budget=budget, overrides=list(set_ or []), ram=ram, device=device)


@app.command()
def merge(
    run: RunArg,
    merge_base: Annotated[str, typer.Option(help="full (default) | dequantized (merge into the 4-bit copy)")] = "full",
    force: Annotated[bool, typer.Option(help="Redo even if done")] = False,
) -> None:
    """Merge the adapter into the full-precision base, shard by shard, and prove it by logits."""
    from .pipeline import run_single_stage

    run_single_stage(run, "merge", force=force, overrides=[f"model.merge_base={merge_base}"])


@app.command()
def export(
    run: RunArg,
    quant: Annotated[list[str] | None, typer.Option(help="Q4_K_M (default), Q5_K_M, Q6_K, Q8_0, F16; repeatable")] = None,
    adapter: Annotated[bool, typer.Option(help="Also export the LoRA as a GGUF adapter")] = False,
    pre_tokenizer: Annotated[str | None, typer.Option(
        help="llama.cpp pre-tokenizer (qwen2, llama-bpe, gpt-2, ...) for a vocabulary the converter does not "
             "recognise; checked by token parity")] = None,
    force: Annotated[bool, typer.Option(help="Redo even if done")] = False,
) -> None:
    """Convert the merged model to GGUF with llama.cpp's converter, quantize, verify every file."""
    from .pipeline import run_single_stage

    overrides = []
    if quant:
        overrides.append("export.quants=[" + ",".join(quant) + "]")
    if adapter:
        overrides.append("export.adapter_gguf=true")
    if pre_tokenizer:
        overrides.append(f"export.pre_tokenizer={pre_tokenizer}")
    run_single_stage(run, "export", force=force, overrides=overrides)


@app.command()
def modelfile(
    run: RunArg,
    check: Annotated[bool, typer.Option(help="Prove the Go TEMPLATE renders exactly like the training chat template")] = False,
    name: Annotated[str | None, typer.Option(help="Model name (file: modelfiles/<name>.Modelfile)")] = None,
    force: Annotated[bool, typer.Option(help="Redo even if done")] = False,
) -> None:
    """Write an Ollama Modelfile whose TEMPLATE and stop tokens match the training chat template."""
    from .pipeline import run_single_stage

    overrides = [f"ollama.name={name}"] if name else []
    if check:
        from .ollama.stage import check_run_command

        check_run_command(run)
        return
    run_single_stage(run, "modelfile", force=force, overrides=overrides)


@app.command()
def register(
    run: RunArg,
    name: Annotated[str | None, typer.Option(help="Model name in Ollama, e.g. my-medical-model (or name:v2)")] = None,
    tag: Annotated[str | None, typer.Option(help="Version tag, e.g. v2: registers name:v2 (default: ollama.tag, latest)")] = None,
    host: Annotated[str | None, typer.Option(help="Ollama URL (default: $OLLAMA_HOST or http://127.0.0.1:11434)")] = None,
    force: Annotated[bool, typer.Option(help="Register even if the evaluation gate refuses")] = False,
) -> None:
    """Upload the GGUF (only if missing) and create the model through the Ollama API, then verify.

    Versions: `--tag v2` registers `<name>:v2` beside earlier tags; the run's manifest records which
    name:tag it became, and `ollama-ft eval RUN --against OTHER` names both sides' lineage.
    """
    from .pipeline import run_single_stage

    overrides = [f"ollama.name={name}"] if name else []
    if tag:
        overrides.append(f"ollama.tag={tag}")
    if host:
        overrides.append(f"ollama.host={host}")
    run_single_stage(run, "register", force=True, overrides=overrides, gate_force=force)


@app.command("run")
def run_model(
    name: Annotated[str, typer.Argument(help="Model name in Ollama, or a run name with --local")],
    prompt: Annotated[str, typer.Argument(help="The user message")],
    local: Annotated[bool, typer.Option(help="Run the run's GGUF with llama-cpp-python instead of Ollama")] = False,
    system: Annotated[str | None, typer.Option(help="System prompt")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate")] = 256,
    host: Annotated[str | None, typer.Option(help="Ollama URL")] = None,
) -> None:
    """Chat once with a model: through Ollama, or locally on the GGUF with --local."""
    from .ollama.run import run_command

    run_command(name, prompt, local=local, system=system, max_tokens=max_tokens, host=host)


@app.command("eval")
def eval_(
    run: RunArg,
    via: Annotated[str, typer.Option(help="llama_cpp (default: the GGUF files) | ollama (through the API)")] = "llama_cpp",
    max_examples: Annotated[int | None, typer.Option(help="Evaluate at most this many test examples")] = None,
    against: Annotated[str | None, typer.Option(help="Compare with another run's tuned model instead of the base "
                                                      "(same test split required); writes report-vs-OTHER/")] = None,
    force: Annotated[bool, typer.Option(help="Redo even if done")] = False,
) -> None:
    """Base vs tuned on the test split: key facts, perplexity, ROUGE-L, BLEU, chrF, stop behaviour,
    general-text perplexity (forgetting), significance; report.md + report.html.

    `--against OTHER_RUN` compares two tuned models the same way (e.g. v1 vs v2).
    """
    overrides = [f"eval.via={via}"]
    if max_examples:
        overrides.append(f"eval.max_examples={max_examples}")
    if against:
        from .eval.against import eval_against

        eval_against(run, against, overrides)
        return
    from .pipeline import run_single_stage

    run_single_stage(run, "eval", force=force, overrides=overrides)


@app.command()
def review(
    run: RunArg,
    against: Annotated[str | None, typer.Option(help="Compare with this other run's tuned model instead of the base "
                                                "(same test examples required)")] = None,
    reviewer: Annotated[str | None, typer.Option(help="Your name; each reviewer has their own ratings file "
                                                 "(default: your login name)")] = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (default 0: a free one)")] = 0,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in the default browser")] = False,
    export_csv: Annotated[Path | None, typer.Option(help="Write every reviewer's ratings (sides named) to this CSV "
                                                    "and exit")] = None,
    report: Annotated[bool, typer.Option(help="Re-render the eval report with the human-review section from the "
                                         "ratings (no model is run) and exit")] = False,
) -> None:
    """Blind human review: two answers per held-out question (A/B, random order) in a local page.

    Serves 127.0.0.1 on a free port, with a secret token in the URL it prints.

    Rate relevance, fluency and professionalism 1-5 and pick the better answer, all by keyboard.

    Every rating is saved at once to runs/RUN/review/ (one file per reviewer); run it again to resume.

    Which answer came from which model is shown only in the report:

      ollama-ft review demo --reviewer alice     # rate

      ollama-ft review demo --report             # scores, sign test, Wilcoxon, combined score
    """
    from .review.command import review_command

    review_command(run, against=against, reviewer=reviewer, port=port, open_browser=open_browser,
                   export_csv=export_csv, report=report)


# Registry login and TLS, shared by publish and install. The password is never an option value
# (visible in `ps` and shell history): it comes from stdin, a prompt, the environment or docker's config.
UsernameOpt = Annotated[str | None, typer.Option(
    help="Registry user; the password is read from --password-stdin, else asked on the terminal "
         "(default: $OLLAMA_FT_REGISTRY_USER/_PASSWORD, then ~/.docker/config.json)")]
PasswordStdinOpt = Annotated[bool, typer.Option(help="Read the registry password from the first line of stdin")]
CaCertOpt = Annotated[Path | None, typer.Option(
    help="PEM file of the CA that signed the registry's TLS certificate (added to the system store)")]


@app.command()
def publish(
    name: Annotated[str, typer.Argument(help="Ollama model name or run name, e.g. my-medical-model")],
    registry: Annotated[str | None, typer.Option(help="HOST:PORT\\[/namespace], e.g. 127.0.0.1:5000/team "
                                                 "(default: publish.registry of the run's config, then $OLLAMA_FT_REGISTRY)")] = None,
    tag: Annotated[str | None, typer.Option(help="Tag to push (default: latest)")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow plain HTTP to a non-loopback registry")] = False,
    store: Annotated[Path | None, typer.Option(help="Read the model from this Ollama store (default: run artifacts, then ~/.ollama/models)")] = None,
    chunk_mb: Annotated[float, typer.Option(help="Upload chunk size in MiB; an interrupted publish resumes at a chunk boundary")] = 64,
    username: UsernameOpt = None,
    password_stdin: PasswordStdinOpt = False,
    ca_cert: CaCertOpt = None,
) -> None:
    """Push a model to an OCI registry in Ollama's format (no Ollama server needed).

    Blobs the registry already has are skipped; run the same command again after an
    interruption and only the missing bytes are sent.

    A registry that asks for a login gets, first found: --username with the password from
    --password-stdin or a prompt; $OLLAMA_FT_REGISTRY_USER + $OLLAMA_FT_REGISTRY_PASSWORD; the
    registry's entry in ~/.docker/config.json (`docker login`). Basic auth and bearer tokens both work.
    """
    from .ollama.registry_push import publish_command

    registry, tag, insecure, ca_cert = _publish_defaults(name, registry, tag, insecure, ca_cert)
    publish_command(name, registry=registry, tag=tag, insecure=insecure, store=store,
                    chunk_size=max(1, int(chunk_mb * (1 << 20))), username=username,
                    password_stdin=password_stdin, ca_cert=ca_cert)


def _publish_defaults(name: str, registry: str | None, tag: str | None, insecure: bool,
                      ca_cert: Path | None) -> tuple[str, str | None, bool, Path | None]:
    """--registry/--tag/--insecure/--ca-cert, else the run config's `publish` section, else $OLLAMA_FT_REGISTRY."""
    run_yaml = Path(name) / "run.yaml" if Path(name).is_dir() else Path("runs") / name / "run.yaml"
    if run_yaml.is_file() and (registry is None or tag is None or ca_cert is None):
        from .core.config import load_config

        pub = load_config(run_yaml).config.publish
        registry = registry or pub.registry
        tag = tag or pub.tag
        insecure = insecure or pub.insecure
        ca_cert = ca_cert or (Path(pub.ca_cert) if pub.ca_cert else None)
    registry = registry or os.environ.get("OLLAMA_FT_REGISTRY")
    if not registry:
        raise UserError("no registry given for publish",
                        hint="pass --registry HOST:PORT/namespace, set publish.registry in the config, "
                             "or export OLLAMA_FT_REGISTRY (make publish REGISTRY=...)")
    return registry, tag, insecure, ca_cert


@app.command()
def install(
    ref: Annotated[str, typer.Argument(help="HOST:PORT/namespace/NAME:TAG")],
    store: Annotated[Path | None, typer.Option(help="Write into this Ollama store directory instead of the API")] = None,
    host: Annotated[str | None, typer.Option(help="Ollama URL")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow plain HTTP to a non-loopback registry")] = False,
    name: Annotated[str | None, typer.Option(help="Local name (default: NAME:TAG)")] = None,
    username: UsernameOpt = None,
    password_stdin: PasswordStdinOpt = False,
    ca_cert: CaCertOpt = None,
) -> None:
    """Fetch a model from a registry (every digest verified) and register it into the local Ollama.

    Credentials and TLS work as for `publish` (--username/--password-stdin, $OLLAMA_FT_REGISTRY_USER
    and _PASSWORD, ~/.docker/config.json; --ca-cert for a private CA).
    """
    from .ollama.registry_pull import install_command

    install_command(ref, store=store, host=host, insecure=insecure, name=name, username=username,
                    password_stdin=password_stdin, ca_cert=ca_cert)


@app.command()
def status(
    run: RunArg,
    runs_dir: Annotated[str, typer.Option(help="Where runs live")] = "runs",
) -> None:
    """Show each stage of a run: done / stale / pending, with artifacts and timings."""
    from .core import ui
    from .core.runs import Run

    r = Run.open(run, runs_dir)
    rows = r.status()
    color = {"done": "green", "stale": "yellow", "pending": "dim"}
    ui.table(
        f"run {r.root}",
        ["stage", "state", "seconds", "artifacts"],
        [[x["stage"], f"[{color[x['state']]}]{x['state']}[/]" + (f" ({x['reason']})" if x.get("reason") else ""),
          "" if x["seconds"] is None else f"{x['seconds']:.1f}", x["artifacts"]] for x in rows],
    )


@app.command()
def doctor(
    host: Annotated[str | None, typer.Option(help="Ollama URL to probe")] = None,
) -> None:
    """Check what works on this machine (torch, CUDA, 4-bit, llama.cpp, converter, Ollama, disk), with fixes."""
    from .doctor import doctor_command

    doctor_command(host=host)


# ------------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    """Library chatter that is noise for our users: per-file tqdm bars in logs (not on a terminal), and
    bitsandbytes' note about an optional Hub kernel package it cannot fetch offline anyway."""
    import logging

    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


EXIT_USER_ERROR = 1
EXIT_INTERNAL = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells and `make` expect after Ctrl-C


def _write_crash_log() -> Path | None:
    """The full traceback of an internal failure, kept where the user can attach it to a report."""
    import time
    import traceback

    from .core.files import cache_root

    try:
        d = cache_root() / "logs"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(f"ollama-ft {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
        return path
    except OSError:
        return None


def main() -> None:
    """Exit codes scripts can trust: 0 ok, 1 user error (one red line), 2 internal failure (log path),
    130 interrupted (what was kept and how to resume)."""
    _quiet_libraries()
    from .core import ui

    try:
        rc = app(standalone_mode=False)
    except UserError as e:
        ui.print_error(e.message, e.hint, e.details)
        if _state["verbose"]:
            import traceback

            traceback.print_exc()
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        rc = EXIT_INTERRUPTED
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:  # click turns Ctrl-C at a prompt into Abort
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        import click

        if isinstance(e, click.ClickException):  # usage errors: bad option, missing argument
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, OSError) and e.errno == 28:  # ENOSPC, wherever it surfaced
            where = getattr(e, "filename", None) or "the output directory"
            ui.print_error(f"disk full at {where}", "free some space (or point runs_dir / OLLAMA_FT_CACHE at a "
                           "larger disk) and re-run; finished stages are kept")
            sys.exit(EXIT_USER_ERROR)
        if _state["verbose"]:
            raise
        log = _write_crash_log()
        ui.print_error(f"internal error: {type(e).__name__}: {e}",
                       f"this is a bug in ollama-ft; the traceback is in {log}" if log
                       else "this is a bug in ollama-ft; re-run with --verbose for the traceback")
        sys.exit(EXIT_INTERNAL)
    # standalone_mode=False hands back the code a command returned or raised (typer.Exit, Ctrl-C in
    # click's own handling: 130); dropping it made an interrupted `make demo` report success.
    if rc == EXIT_INTERRUPTED:
        ui.print_error("interrupted; finished stages and training checkpoints are kept",
                       "re-run the same command to continue where it stopped")
    if isinstance(rc, int) and rc != 0:
        sys.exit(rc)


if __name__ == "__main__":
    main()
