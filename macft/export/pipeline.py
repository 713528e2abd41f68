"""``macft export gguf`` as one library call: pick the weights, write the GGUF, optionally a Modelfile.

    report = export_gguf(model="fused/quickstart", quant="q4_k_m")              # a model directory
    report = export_gguf(adapter="runs/quickstart", quant="q8_0", ollama=True)   # base + adapter, fused
    report = export_gguf(adapter="runs/quickstart", adapter_only=True)           # LoRA GGUF for --lora
    report = export_gguf(adapter="runs/quickstart", quant="q4_k_m", ollama="my-model")  # + `ollama create my-model`
    report = export_gguf(adapter="runs/quickstart", quant="q4_k_m", lm_studio=True)     # into LM Studio's models folder

Exporting a run to Q4_K_M, Q5_K_M or Q4_0 quantizes with what the run knows (its importance matrix, computed
once into ``RUN/imatrix.safetensors``, and how much the fine-tune changed each weight: ``guidance``;
``plain=True`` turns this off, ``plain=False`` turns it on for the other types) and ends with a fidelity report: the file scored against the fused float model on
a sample of the run's validation data (``fidelity``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from macft.errors import MacftError
from macft.export.fidelity import DEFAULT_EXAMPLES
from macft.phases import phase


@dataclass
class ExportReport:
    gguf: dict  # GGUFResult.to_dict() or AdapterGGUFResult.to_dict()
    modelfile: str | None = None
    ollama_command: str | None = None
    ollama_created: bool = False  # `ollama create` ran and succeeded
    notes: list[str] = field(default_factory=list)
    fidelity: dict | None = None  # Fidelity.to_dict() for exports of a run

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def default_out(model: str | None, adapter: str | None, quant: str, adapter_only: bool) -> Path:
    if adapter is not None:
        run = Path(adapter)
        return run / (f"{run.resolve().name}-lora.gguf" if adapter_only else f"{run.resolve().name}-{quant}.gguf")
    stem = Path(str(model).rstrip("/")).name.removesuffix(".gguf")
    return Path(f"{stem}-{quant}.gguf")


def export_gguf(
    *,
    model: str | None = None,
    adapter: str | None = None,
    quant: str = "f16",
    out: str | Path | None = None,
    adapter_only: bool = False,
    ollama: bool | str = False,
    lm_studio: bool = False,
    name: str | None = None,
    force: bool = False,
    plain: bool | None = None,
    fidelity_examples: int = DEFAULT_EXAMPLES,
) -> ExportReport:
    """``plain``: True for llama-quantize's types and rounding, ignoring the run's importance matrix and
    deltas; False for the guided export; None for the quant type's default (``Scheme.guided``: guided
    for Q4_K_M, Q5_K_M and Q4_0, where it pays);
    ``fidelity_examples``: validation examples the fidelity report scores (0: no report).
    ``ollama``: True writes a Modelfile and the ``ollama create`` command to run; a model name also
    runs it when Ollama is installed. ``lm_studio`` writes the GGUF into LM Studio's models folder."""
    from macft.export.fuse import origin_gguf
    from macft.export.quant_plan import SCHEMES

    if (model is None) == (adapter is None):
        raise MacftError("Pass exactly one of --model DIR or --adapter RUN.")
    if adapter_only and adapter is None:
        raise MacftError("--adapter-only needs --adapter RUN.")
    if isinstance(ollama, str) and ollama:
        from macft.export.apps import ollama_model_name

        ollama = ollama_model_name(ollama)  # a bad name fails before the export, not after
    if lm_studio and (adapter_only or out is not None):
        raise MacftError("--lm-studio writes a whole model into LM Studio's folder; drop --adapter-only and --out.")
    out = Path(out) if out is not None else default_out(model, adapter, quant, adapter_only)
    if lm_studio:
        from macft.export.apps import lm_studio_path

        out = lm_studio_path(out.name)
        out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix != ".gguf":
        raise MacftError(f"The output file should end in .gguf (got {out}).")
    out = check_export_outputs(out, model, adapter, ollama, force)
    if adapter_only:
        return _adapter_only(Path(adapter), out, ollama)

    from macft.export.gguf_writer import write_gguf

    notes, guide = [], None
    if adapter is not None:
        from macft.export.fuse import load_fused
        from macft.export.guidance import base_layers

        snapshot: dict = {}
        loaded, _, _ = load_fused(adapter, dequantize=True, on_base=lambda base: snapshot.update(base_layers(base)))
        scheme = SCHEMES.get(quant)
        if scheme is not None and quant not in ("f16", "bf16") and (scheme.guided if plain is None else not plain):
            try:
                with phase("Importance matrix and fine-tune deltas"):
                    guide, note = _run_guide(Path(adapter), loaded, snapshot)
            except MacftError as exc:  # e.g. the run's training data moved: its deltas still guide the types
                from macft.export.guidance import QuantGuide

                guide = QuantGuide.build(snapshot, loaded.model, None)
                note = f"quantized without an importance matrix: {exc}"
            notes.append(note)
        snapshot.clear()
    else:
        from macft.models.load import load_model

        loaded = load_model(model)
    source = Path(loaded.identity["source"])
    tokenizer_gguf = source if source.suffix == ".gguf" and source.is_file() else origin_gguf(loaded.path)
    with phase(f"Writing {out.name} ({quant})"):
        result = write_gguf(
            loaded.model,
            loaded.config,
            loaded.family,
            out,
            quant,
            tokenizer_dir=loaded.path,
            tokenizer_gguf=tokenizer_gguf,
            name=name,
            guide=guide,
        )
    report = ExportReport(result.to_dict(), notes=notes)
    if adapter is not None and fidelity_examples > 0:
        started = time.monotonic()
        with phase(f"Fidelity report: scoring {out.name} against the float model (--fidelity 0 skips it)"):
            report.fidelity = _fidelity(Path(adapter), out, loaded, quant, fidelity_examples, report.notes)
        if report.fidelity:
            report.notes.append(f"the fidelity report took {time.monotonic() - started:.0f} s of the export (--fidelity 0 skips it)")
    if tokenizer_gguf is not None:
        report.notes.append(f"tokenizer copied from {tokenizer_gguf}")
    if ollama:
        from macft.export.modelfile import ModelfileSpec

        spec = ModelfileSpec(
            model=str(out.resolve()),
            chat_template=getattr(loaded.tokenizer, "chat_template", None),
            eos_token=getattr(loaded.tokenizer, "eos_token", None),
            context_length=int(loaded.config.get("max_position_embeddings", 4096)),
        )
        _add_modelfile(report, spec, out, ollama)
    if lm_studio:
        report.notes.append(f"LM Studio lists it as {out.parent.parent.name}/{out.parent.name}")
    return report


def _run_guide(run_dir: Path, loaded, snapshot: dict):
    from macft.export.guidance import QuantGuide
    from macft.export.imatrix import IMATRIX_FILE, run_imatrix

    imatrix, computed = run_imatrix(run_dir, loaded)
    guide = QuantGuide.build(snapshot, loaded.model, imatrix)
    where = run_dir / IMATRIX_FILE
    if computed:
        return guide, f"importance matrix computed from {imatrix.tokens} training tokens → {where}"
    return guide, f"importance matrix from {where} ({imatrix.tokens} training tokens)"


def _fidelity(run_dir: Path, out: Path, loaded, quant: str, count: int, notes: list[str]) -> dict | None:
    from macft.export.fidelity import measure_fidelity, validation_sample

    try:
        examples, split = validation_sample(run_dir, loaded.tokenizer, count)
    except MacftError as exc:
        notes.append(f"no fidelity report: {exc}")
        return None
    if not examples:
        notes.append("no fidelity report: the run has no validation or test examples")
        return None
    report = measure_fidelity(out, loaded.model, examples, quant=quant)
    if split != "valid":
        notes.append(f"fidelity measured on the {split} split (the run has no validation split)")
    return report.to_dict()


def check_export_outputs(out: Path, model: str | None, adapter: str | None, ollama: bool | str, force: bool) -> Path:
    """Refuse, before any work, to write over an input or over files `macft export gguf` did not write;
    return the path to write."""
    from macft.export.fuse import origin_gguf, run_inputs
    from macft.export.gguf_writer import is_exported_gguf
    from macft.export.modelfile import is_exported_modelfile
    from macft.outputs import check_output

    inputs: list[Path | str | None] = [model]
    if model is not None and Path(model).expanduser().is_dir():
        inputs.append(origin_gguf(Path(model).expanduser()))
    if adapter is not None:
        inputs += run_inputs(Path(adapter))
    out = check_output(out, "export gguf", made_by=is_exported_gguf, inputs=inputs, force=force)
    if ollama:
        check_output(out.with_suffix(".Modelfile"), "export gguf", made_by=is_exported_modelfile, inputs=inputs, force=force)
    return out


def _adapter_only(run_dir: Path, out: Path, ollama: bool | str) -> ExportReport:
    from macft.export.adapter_gguf import write_adapter_gguf

    result = write_adapter_gguf(run_dir, out)
    report = ExportReport(result.to_dict())
    if ollama:
        from macft.models.tokenizer_cache import load_tokenizer

        from macft.export.fuse import origin_gguf, read_adapter_config
        from macft.export.modelfile import ModelfileSpec
        from macft.models.load import resolve_model_dir

        base = read_adapter_config(run_dir)["base_model"]
        base_dir, _ = resolve_model_dir(base["source"])
        base_gguf = origin_gguf(base_dir)  # GGUF imports (the embedded default too) remember their file
        if base_gguf is None:
            report.notes.append(
                f"the base is not a GGUF file: the Modelfile points FROM at {base_dir}; "
                "export the base with `macft export gguf --model` for a GGUF base instead"
            )
        tokenizer = load_tokenizer(base_dir)
        spec = ModelfileSpec(
            model=str(Path(base_gguf or base_dir).resolve()),
            adapter=str(out.resolve()),
            chat_template=getattr(tokenizer, "chat_template", None),
            eos_token=getattr(tokenizer, "eos_token", None),
        )
        _add_modelfile(report, spec, out, ollama)
    return report


def _add_modelfile(report: ExportReport, spec, out: Path, ollama: bool | str) -> None:
    from macft.export.apps import ADAPTER_VERSIONS_NOTE, ollama_create
    from macft.export.modelfile import chat_format, ollama_command, write_modelfile

    path = write_modelfile(spec, out.with_suffix(".Modelfile"))
    report.modelfile = str(path)
    if chat_format(spec.chat_template) is None:
        report.notes.append("unrecognised chat template: the Modelfile relies on the template stored in the GGUF")
    if spec.adapter:
        report.notes.append(ADAPTER_VERSIONS_NOTE)
    if not isinstance(ollama, str) or not ollama:
        report.ollama_command = ollama_command(out.stem.replace("_", "-").lower(), path)
        return
    created = ollama_create(ollama, path)
    report.ollama_command, report.ollama_created = created.command, created.ran
    if not created.ran:
        report.notes.append("the `ollama` command is not installed here; run the command below where Ollama is")
