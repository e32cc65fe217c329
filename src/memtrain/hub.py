"""Model cards and Hub pushes for trained checkpoints and adapters.

Card templates are Jinja files (huggingface_hub card templates) kept in ONE place, ``hub_cards/`` at the repository
root. An installed package finds them through ``memtrain/resources/hub_cards``, a symlink to that folder in the source
tree that setuptools resolves into real files when it builds a wheel. :func:`hub_card_template` looks in the checkout
first, then in the installed package, so any card (model or dataset) is found the same way.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, RepoCard
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from memtrain.preflight import HF_TOKEN_VALUE, is_secret_key


__all__ = [
    "MEMTRAIN_TAGS",
    "DEFAULT_IGNORE_PATTERNS",
    "ModelCardCallback",
    "hub_card_template",
    "render_model_card",
    "push_built_dataset",
    "push_folder_to_hub",
]

logger = logging.getLogger(__name__)

MEMTRAIN_TAGS = ("memtrain", "grpo", "trl", "memory-agent")

# Trainer output folders also hold resumable checkpoints (optimizer state: several times the model size) and caches.
DEFAULT_IGNORE_PATTERNS = (
    ".git/*", ".cache/*", "checkpoint-*", "__pycache__/*", "*/__pycache__/*", ".memtrain.lock",
)  # fmt: skip

_REPO_HUB_CARDS = Path(__file__).resolve().parents[2] / "hub_cards"
_FRAMEWORKS = ("memtrain", "transformers", "trl", "peft", "accelerate", "datasets", "torch")
# Recipe keys whose values must never be published (a recipe may carry a token for pushing).
_SECRET_KEY = re.compile(
    r"^(?P<indent>\s*-?\s*)(?P<key>[\w.-]*(?:token|api_key|apikey|secret|password))"
    r"(?P<sep>\s*:\s*)(?P<value>\S.*)$",
    re.IGNORECASE | re.MULTILINE,
)


def hub_card_template(name: str) -> Path:
    """Path of the card template ``name`` (e.g. ``"model_card.md"``), from the checkout or the installed package."""
    candidates = [_REPO_HUB_CARDS / name]
    try:
        packaged = importlib.resources.files("memtrain") / "resources" / "hub_cards" / name
        candidates.append(Path(str(packaged)))
    except (ModuleNotFoundError, TypeError):  # a zipped install without a filesystem path
        pass
    for path in candidates:
        if path.is_file():
            return path
    searched = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"No hub card template named {name!r} (looked in {searched}). Templates live in hub_cards/ at the "
        "repository root; reinstall memtrain if the package copy is missing."
    )


def _hub_id(value: str, what: str) -> str:
    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise ValueError(f"{what} must be a Hub repo id such as 'alice/my-model', got {value!r} ({err}).") from err
    return value


def _hub_ref(value: str | None, what: str, url_prefix: str) -> tuple[str | None, str]:
    """(the Hub id for the card's metadata or None, the Markdown reference for its text).

    A base model or dataset loaded from a local folder, a file or a packaged name is still named on the card, but it
    is kept out of the metadata, which the Hub reads as a link to an existing repo.
    """
    from memtrain.models import packaged_model_name  # lazily: models imports trl

    if value is None:
        return None, f"a local {what} (not published)"
    try:
        validate_repo_id(value)
        is_local = Path(value).exists() or value.endswith((".gguf", ".json", ".jsonl", ".parquet"))
        is_local = is_local or packaged_model_name(value) is not None
    except HFValidationError:
        is_local = True
    if is_local:
        logger.warning(
            "The %s %r is not a Hub repo id: it is named on the model card but left out of its metadata. Pass the "
            "Hub id it came from to link it.",
            what,
            value,
        )
        return None, f"a local {what} (`{value}`)"
    return value, f"[{value}](https://huggingface.co/{url_prefix}{value})"


def _redact_secrets(recipe_yaml: str) -> str:
    """Blank the values of token/key/secret/password entries so a card never publishes credentials."""

    def redact(match: re.Match[str]) -> str:
        if not is_secret_key(match["key"]):  # pad_token, max_memory_tokens ...: tokenizer fields and counts
            return match[0]
        return f"{match['indent']}{match['key']}{match['sep']}<redacted>"

    # A token given on a command line travels as a bare value (``--hub_token hf_...``), not as a ``key: value``.
    return HF_TOKEN_VALUE.sub("<redacted>", _SECRET_KEY.sub(redact, recipe_yaml))


def _code_fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside ``text``, so the code block cannot be closed early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _format_metric(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "n/a"
    return f"{value:.4f}"


def _framework_versions() -> list[tuple[str, str]]:
    versions = []
    for name in _FRAMEWORKS:
        try:
            versions.append((name, importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            if name == "memtrain":
                from memtrain import __version__

                versions.append((name, __version__))
    return versions


def render_model_card(
    *,
    repo_id: str | None,
    base_model: str,
    recipe_name: str,
    recipe_yaml: str,
    dataset_id: str | None,
    metrics: Mapping[str, object],
    is_adapter: bool,
    license: str = "apache-2.0",
    language: str | Sequence[str] = "en",
    extra_tags: Sequence[str] = (),
    template: str = "model_card.md",
    local_path: str | Path | None = None,
) -> ModelCard:
    """The model card of a trained checkpoint: Hub metadata, what MemTrain is, the recipe, metrics and usage.

    ``license`` defaults to Apache-2.0, the licence of the paper's backbones (Qwen2.5/Qwen3) and of SmolLM2; set it
    to your base model's licence otherwise. ``base_model`` and ``dataset_id`` should be Hub ids, which the metadata
    links; a local path or packaged name is named in the text only (with a warning). Secrets in ``recipe_yaml`` (token, api_key, password, ... values) are
    replaced by ``<redacted>``. ``metrics`` maps a metric name to its value (floats shown with 4 decimals).
    """
    if repo_id is None and local_path is None:
        raise ValueError("render_model_card needs the repo_id it is pushed to, or the local_path it is saved in.")
    # A local folder's card (written at every save, before any push) loads the model from the folder itself.
    model_ref = _hub_id(repo_id, "repo_id") if repo_id is not None else str(local_path)
    base_model_id, base_model_ref = _hub_ref(base_model, "base model", "")
    dataset_hub_id, dataset_ref = _hub_ref(dataset_id, "dataset", "datasets/")
    tags = list(dict.fromkeys([*MEMTRAIN_TAGS, *(["lora", "peft"] if is_adapter else []), *extra_tags]))
    card_data = ModelCardData(
        base_model=base_model_id,
        library_name="peft" if is_adapter else "transformers",
        tags=tags,
        datasets=[dataset_hub_id] if dataset_hub_id else None,
        license=license,
        language=[language] if isinstance(language, str) else list(language),
        pipeline_tag="text-generation",
        model_name=model_ref.rstrip("/").split("/")[-1],
    )
    recipe = _redact_secrets(recipe_yaml.strip("\n"))
    rows = [(str(name).replace("|", "\\|"), _format_metric(value)) for name, value in metrics.items()]
    return ModelCard.from_template(
        card_data,
        template_path=str(hub_card_template(template)),
        repo_id=model_ref,
        recipe_name=recipe_name,
        recipe_yaml=recipe,
        recipe_fence=_code_fence(recipe),
        base_model_ref=base_model_ref,
        dataset_ref=dataset_ref,
        metric_rows=rows,
        is_adapter=is_adapter,
        framework_versions=_framework_versions(),
    )


def push_folder_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    card: RepoCard | None = None,
    private: bool = False,
    commit_message: str = "Upload with memtrain",
    token: str | None = None,
    repo_type: str = "model",
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
    revision: str | None = None,
) -> str:
    """Create the repo if needed and upload ``folder`` with ``card`` as its README.md, in ONE commit.

    One commit (rather than upload_folder followed by a card push) means the repo never shows weights without their
    card. ``card`` replaces any README.md in the folder. Returns the commit URL.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot push {folder}: it is not a folder (give the output_dir of a training run).")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = list(filter_repo_objects(files, ignore_patterns=list(ignore_patterns)))
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
    if card is not None:
        operations = [op for op in operations if op.path_in_repo != "README.md"]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    if not operations:
        raise ValueError(
            f"Nothing to push from {folder}: it has no files outside the ignore patterns {ignore_patterns}."
        )
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True)
    commit = api.create_commit(
        repo_id=repo_url.repo_id,
        repo_type=repo_type,
        operations=operations,
        commit_message=commit_message,
        revision=revision,
    )
    return commit.commit_url


def push_built_dataset(
    output_dir: str | Path, repo_id: str, *, commit_message: str, private: bool = False, card: RepoCard | None = None
) -> str:
    """Push a builder's finished output folder (parquet + card; the ``save_to_disk`` copy stays local).

    The build is complete on disk by now, so a failed upload is a :class:`memtrain.preflight.PushError` that says so
    and how to push later, not the loss of hours of building.
    """
    from memtrain.preflight import push_failed

    try:
        return push_folder_to_hub(
            output_dir, repo_id, card=card, private=private, repo_type="dataset",
            ignore_patterns=("dataset/*",), commit_message=commit_message,
        )  # fmt: skip
    except Exception as error:
        raise push_failed(error, output_dir, repo_id, repo_type="dataset") from error


class ModelCardCallback(TrainerCallback):
    """Writes the memtrain model card (``README.md``) into every checkpoint folder as it is saved.

    A checkpoint folder then says what it is (base model, adapter or full weights, data, the recipe, the metrics
    logged so far) without a push; :meth:`write` does the same for the final ``output_dir`` after ``save_model``.
    It runs after the save, so it replaces the generic card PEFT writes next to an adapter.
    """

    def __init__(
        self,
        *,
        base_model: str,
        recipe_name: str,
        recipe_yaml: str,
        dataset_id: str | None,
        is_adapter: bool,
        repo_id: str | None = None,
    ) -> None:
        self.card_kwargs = {
            "base_model": base_model, "recipe_name": recipe_name, "recipe_yaml": recipe_yaml,
            "dataset_id": dataset_id, "is_adapter": is_adapter,
        }  # fmt: skip
        self.repo_id = repo_id

    def write(self, folder: str | Path, metrics: Mapping[str, object]) -> Path:
        """Render the card for ``folder`` (loaded from the folder itself unless a Hub repo id was given)."""
        card = render_model_card(repo_id=self.repo_id, local_path=folder, metrics=metrics, **self.card_kwargs)
        path = Path(folder) / "README.md"
        path.write_text(str(card), encoding="utf-8")
        return path

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return control
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            latest = next((entry for entry in reversed(state.log_history) if "loss" in entry), {})
            metrics = {k: v for k, v in latest.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.write(folder, {"global_step": state.global_step, **metrics})
        return control
