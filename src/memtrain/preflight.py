"""Checks that run before anything expensive (model load, warm start, hours of training or building).

Every check here is cheap and raises :class:`PreflightError` (a ``ValueError``) with one line naming the problem and
the fix, so a typo, an impossible value, a folder that cannot be written or a push that cannot succeed fails in
seconds instead of after the model load, the warm start or the whole run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memtrain.data.rows import check_rows


__all__ = [
    "PreflightError",
    "PushError",
    "push_failed",
    "check_writable",
    "SECRET_KEY",
    "HF_TOKEN_VALUE",
    "is_secret_key",
    "error_summary",
    "scrub_secrets",
    "check_training_values",
    "check_reward_names",
    "check_output_dir",
    "check_push",
    "check_training_rows",
    "check_dataset_size",
    "check_grpo_options",
    "check_vllm_lora_sync",
    "check_utf8_file",
    "not_utf8",
    "read_utf8_text",
    "complete_checkpoints",
    "is_complete_checkpoint",
    "clear_previous_run",
    "RUN_LOCK",
    "OutputDirLock",
    "claim_output_dir",
]


class PreflightError(ValueError):
    """A value or a precondition that would make the run fail (or silently do the wrong thing) later."""


class PushError(RuntimeError):
    """The run finished and its output is complete on disk; only the upload to the Hub failed."""


def error_summary(error: BaseException) -> str:
    """The first line of an error's message (its type name when empty), to quote inside a one-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def push_failed(error: BaseException, output_dir: str | Path, repo_id: str, repo_type: str = "model") -> PushError:
    """The one line for a push that failed after the expensive part: what is safe on disk and how to push later."""
    first = error_summary(error)
    flag = " --repo-type dataset" if repo_type == "dataset" else ""
    return PushError(
        f"the run finished and {output_dir} holds the complete local output, but the push to {repo_id} failed "
        f"({type(error).__name__}: {first}); push it later with `hf upload {repo_id} {output_dir}{flag} --exclude "
        "'checkpoint-*'`."
    )


# Keys whose values are credentials. Tokenizer fields (pad_token, eos_token ...) and token counts are not.
SECRET_KEY = re.compile(r"(?:token|api_key|apikey|secret|password)$", re.IGNORECASE)
_NOT_SECRET_KEY = re.compile(r"(?:^|_)(?:pad|eos|bos|unk|sep|cls|mask|special)_token$|^max_\w*token$", re.IGNORECASE)
HF_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key)) and not _NOT_SECRET_KEY.search(key)


def scrub_secrets(value: Any, secrets: Sequence[str] = ()) -> Any:
    """``value`` (a recipe: nested dicts/lists/strings) without credentials, for files that are saved or pushed.

    Secret keys (``hub_token``, ``*_api_key``, ``env: {HF_TOKEN: ...}`` ...) are dropped; any string that contains a
    known secret (``secrets``) or looks like a Hub token (``hf_...``) has it replaced by ``<redacted>``.
    """
    if isinstance(value, Mapping):
        return {k: scrub_secrets(v, secrets) for k, v in value.items() if not is_secret_key(str(k))}
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            if secret:
                value = value.replace(secret, "<redacted>")
        return HF_TOKEN_VALUE.sub("<redacted>", value)
    return value


def _as_int(values: Mapping[str, Any], key: str) -> int | None:
    if values.get(key) is None:
        return None
    try:
        number = float(values[key])
    except (TypeError, ValueError):
        raise PreflightError(f"{key} must be a whole number, got {values[key]!r}.") from None
    if number != int(number):
        raise PreflightError(f"{key} must be a whole number, got {values[key]!r}.")
    return int(number)


def check_training_values(values: Mapping[str, Any]) -> None:
    """Training values TRL / transformers would accept and then misuse (or crash on deep inside a step).

    ``values`` is a raw recipe (strings from the command line are fine) or ``vars(training_args)``: this runs before
    the recipe is parsed, because an impossible ``num_generations`` already crashes TRL's config parsing.
    """
    max_steps = _as_int(values, "max_steps")
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise PreflightError(
            f"max_steps must be a positive number of optimizer steps (or -1: train num_train_epochs), got {max_steps}."
        )
    num_generations = _as_int(values, "num_generations")
    if num_generations is not None and num_generations < 2:
        raise PreflightError(
            f"num_generations must be >= 2 (GRPO compares the rollouts of one document), got {num_generations}."
        )
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "recall_samples"):
        number = _as_int(values, key)
        if number is not None and number < 1:
            raise PreflightError(f"{key} must be >= 1, got {number}.")
    if values.get("num_train_epochs") is not None and (max_steps is None or max_steps == -1):
        try:
            epochs = float(values["num_train_epochs"])
        except (TypeError, ValueError):
            raise PreflightError(f"num_train_epochs must be a number, got {values['num_train_epochs']!r}.") from None
        if epochs <= 0:
            raise PreflightError(f"num_train_epochs must be > 0 (or set max_steps), got {epochs}.")
    if values.get("learning_rate") is not None:
        try:
            learning_rate = float(values["learning_rate"])
        except (TypeError, ValueError):
            raise PreflightError(f"learning_rate must be a number, got {values['learning_rate']!r}.") from None
        if not learning_rate >= 0:
            raise PreflightError(f"learning_rate must be >= 0, got {learning_rate}.")


def check_reward_names(names: Sequence[str] | str) -> None:
    """Resolve every reward name now (a misspelling used to surface only when the trainer was built)."""
    from memtrain.rewards import get_reward_funcs

    try:
        get_reward_funcs(names)
    except (TypeError, ValueError) as error:
        raise PreflightError(f"reward_funcs: {error}") from None


def _is_run_file(name: str) -> bool:
    return not name.startswith(".")


def check_output_dir(output_dir: str | Path, *, resuming: bool, overwrite: bool = False) -> None:
    """The output folder can be written, and does not hold another run that this one would silently mix into.

    A run writing into a folder of another run rotates the old checkpoints away, overwrites its final model and
    leaves its newest checkpoint beside the new ones (a later ``resume_from_checkpoint: last`` resumes the wrong run).
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise PreflightError(f"output_dir {output_dir} is a file, not a folder; choose another output_dir.")
    if output_dir.is_dir() and not resuming and not overwrite:
        held = sorted(p.name for p in output_dir.iterdir() if _is_run_file(p.name))
        if held:
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            raise PreflightError(
                f"output_dir {output_dir} already holds files of another run ({shown}); resume it with "
                "--resume_from_checkpoint last, start over with --overwrite_output_dir true (deletes it), or choose a new "
                "output_dir."
            )
    check_writable(output_dir)


def clear_previous_run(output_dir: str | Path) -> list[str]:
    """Delete another run's files from ``output_dir`` (asked for with ``overwrite_output_dir``); returns their names.

    Only after every check has passed, so a refused run deletes nothing; hidden files (staging folders) stay.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    removed = []
    for path in sorted(output_dir.iterdir()):
        if _is_run_file(path.name):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path.name)
    return removed


RUN_LOCK = ".memtrain.lock"  # hidden: not a run file, kept by clear_previous_run, never pushed


class OutputDirLock:
    """An exclusive claim on an output folder (``flock`` on its hidden ``.memtrain.lock``).

    The kernel drops the claim when the process ends however it ends (SIGKILL, a lost shell), so a dead run never
    holds a folder; :meth:`release` drops it earlier and removes the lock file, and the folders the claim created
    when nothing else was written into them (a run refused by a later check leaves nothing behind).
    """

    def __init__(self, folder: Path, path: Path, fd: int, created: list[Path]) -> None:
        self.folder, self.path, self._fd, self._created = folder, path, fd, created

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlinked while held: a claim racing this one sees a new file
        finally:
            os.close(self._fd)
            self._fd = None
        for folder in self._created:  # innermost first; stops at the first folder something was written into
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self) -> OutputDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_output_dir(output_dir: str | Path, what: str = "memtrain run", beside: bool = False) -> OutputDirLock:
    """Claim ``output_dir`` for this process, or refuse at once when a live process holds it.

    Two runs started into one folder both passed the folder checks, trained side by side and left the second one's
    files only; the second is refused now, before anything is loaded. Creates the folder (and its missing parents)
    and claims its ``.memtrain.lock``; ``beside`` claims ``.<name>.lock`` in the parent instead, without creating the
    folder (a build swaps in its whole folder at the end).
    """
    import fcntl

    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise PreflightError(f"output_dir {folder} is a file, not a folder; choose another output_dir.")
    check_writable(folder)
    home = folder.parent if beside else folder
    created = []
    missing = home
    while not missing.exists():
        created.append(missing)
        missing = missing.parent
    home.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f".{folder.name}.lock" if beside else folder / RUN_LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise PreflightError(
                f"output_dir {folder} is in use by another {what} ({owner}); wait for it to finish, or choose "
                "another output_dir."
            ) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the holder released and unlinked it between our open and our lock: claim the new file
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    return OutputDirLock(folder, path, fd, created)


def check_writable(output_dir: str | Path) -> None:
    """``output_dir`` (or the folder it will be created in) accepts a file: checked by writing one, not by mode bits."""
    output_dir = Path(output_dir)
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(f"output_dir {output_dir} cannot be created: {existing} is a file, not a folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".memtrain-write-test-", dir=existing)
    except OSError as error:
        raise PreflightError(
            f"output_dir {output_dir} cannot be written ({error.strerror} in {existing}); choose a writable folder."
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_push(repo_id: str | None, token: str | None) -> str:
    """A push at the end of the run can succeed: a valid repo id, the Hub reachable, a token the Hub accepts.

    Returns the account name. Found after hours of training, any of these loses the push (the local output stays).
    """
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        raise PreflightError(
            "push_to_hub is on but there is no repo to push to; set hub_model_id (e.g. you/my-model)."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PreflightError(
            f"hub_model_id {repo_id!r} is not a Hub repo id such as 'you/my-model' ({error})."
        ) from None
    if constants.HF_HUB_OFFLINE:
        raise PreflightError(
            "push_to_hub is on but the Hub is offline (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE or set "
            "push_to_hub: false and push the output folder later."
        )
    token = token or get_token()
    if not token:
        raise PreflightError(
            "push_to_hub is on but there is no Hub login; run `hf auth login` or set HF_TOKEN (not hub_token in "
            "a recipe), or set push_to_hub: false."
        )
    try:
        account = HfApi(token=token).whoami()
    except Exception as error:  # an HTTP 401, a connection error ...: the push would fail the same way
        raise PreflightError(
            f"push_to_hub is on but the Hub refused the login check ({error_summary(error)}); fix the token / network, or set "
            "push_to_hub: false."
        ) from None
    return str(account.get("name", "")) if isinstance(account, Mapping) else ""


def check_utf8_file(path: str | Path, what: str = "Dataset") -> None:
    """A text data file decodes as UTF-8 (else the error would surface as a raw UnicodeDecodeError mid-training)."""
    path = Path(path)
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise PreflightError(
                    f"{what} {path} line {number} is not UTF-8 ({error.reason} at byte {error.start}); convert the "
                    "file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                ) from None


def not_utf8(path: str | Path, error: UnicodeDecodeError, what: str = "File") -> PreflightError:
    """The one-line error for a text file that is not UTF-8: the file, the line (plain files) and the fix."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() != ".gz":
        try:
            check_utf8_file(path, what)
        except PreflightError as named:
            return named
    return PreflightError(
        f"{what} {path} is not UTF-8 ({error.reason} at byte {error.start}); convert it to UTF-8 (e.g. `iconv -f "
        "latin1 -t utf-8`)."
    )


def read_utf8_text(path: str | Path, what: str = "File") -> str:
    """A text file's content (a UTF-8 byte-order mark dropped); one line naming the file when it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise not_utf8(path, error, what) from None


def check_training_rows(rows: Any, source: str, task: str = "memory") -> None:
    """Rows the trainer can use: the validator of ``memtrain eval`` (one implementation for both).

    A row with an empty ``context`` (0 chunks) or no gold answer (``answers: []`` or a plain string) trained with
    rc 0 before: None rewards, steps skipped silently.
    """
    try:
        check_rows(rows, task, source=source)
    except ValueError as error:
        raise PreflightError(f"{error} Fix or drop the row.".replace("--dataset ", "Dataset ")) from None


def check_dataset_size(num_rows: int, *, generation_batch_size: int, num_generations: int, source: str) -> None:
    """At least one optimizer step of documents (else TRL finds 'not a single sample' and saves the untrained base)."""
    needed = generation_batch_size // num_generations
    if num_rows < needed:
        raise PreflightError(
            f"Dataset {source} has {num_rows} document(s) but one step needs {needed} (generation batch "
            f"{generation_batch_size} rollouts / num_generations {num_generations}); add documents or lower "
            "per_device_train_batch_size / gradient_accumulation_steps."
        )


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _is_complete(checkpoint: Path) -> bool:
    """A checkpoint whose save finished: trainer_state.json (written last) parses and no file is empty.

    Files in subfolders count too (FSDP's sharded state dicts, adapters saved per name).
    """
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(p.stat().st_size > 0 for p in checkpoint.rglob("*") if p.is_file())


def complete_checkpoints(output_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) ``checkpoint-N`` folders of ``output_dir``, oldest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return [], []
    found = sorted(
        (int(m[1]), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name)) is not None
    )
    complete = [p for _, p in found if _is_complete(p)]
    return complete, [p for _, p in found if p not in complete]


def is_complete_checkpoint(checkpoint: str | Path) -> bool:
    return _is_complete(Path(checkpoint))


# GRPOConfig options (TRL 1.16) that MemTrainer's own loss and rollouts do not implement: (name, is it set to
# something MemTrainer would ignore?, what to do instead). Their defaults are what MemTrainer does.
_IGNORED_GRPO_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("loss_type", lambda v: v != "dapo",
     "MemTrainer's loss is the per-token PPO-clip objective aggregated by loss_aggregation; remove loss_type and "
     "set loss_aggregation (conversation_mean, token_mean or rollout_mean)"),
    ("importance_sampling_level", lambda v: v != "token",
     "MemTrainer's PPO ratio is per token (sequence-level GSPO is not implemented); remove it"),
    ("mask_truncated_completions", lambda v: bool(v),
     "truncated memory updates and answers are trained like finished ones; remove it"),
    ("top_entropy_quantile", lambda v: v < 1.0,
     "MemTrainer trains every completion token (no high-entropy token mask); remove it"),
    ("use_liger_kernel", lambda v: bool(v),
     "MemTrainer computes its log-probs with its own forward pass; remove it"),
    ("entropy_coef", lambda v: v != 0.0, "MemTrainer's loss has no entropy bonus; remove it"),
    ("use_adaptive_entropy", lambda v: bool(v), "MemTrainer's loss has no entropy bonus; remove it"),
    ("off_policy_mask_threshold", lambda v: v is not None,
     "MemTrainer's loss has no off-policy sequence mask; remove it"),
    ("delta", lambda v: v is not None,
     "MemTrainer's PPO clip is one-sided per advantage sign (epsilon, epsilon_high); remove delta"),
    ("multi_objective_aggregation", lambda v: v != "sum_then_normalize",
     "MemTrainer sums the weighted rewards, then centres them per group; remove it"),
    ("router_aux_loss_coef", lambda v: v is not None,
     "MemTrainer's loss adds no MoE router auxiliary loss; remove it"),
    ("chat_template_kwargs", lambda v: bool(v),
     "the memory agent renders its prompts with the tokenizer's chat template as is; remove it"),
    ("max_tool_calling_iterations", lambda v: v is not None,
     "MemTrainer has no tool-calling loop (the search agent's turns are search_max_turns); remove it"),
)  # fmt: skip


def check_grpo_options(args: Any) -> None:
    """Refuse every GRPOConfig option set to a value MemTrainer would silently ignore, naming each and the fix.

    MemTrainer replaces TRL's loss and generation loop, so options that only act inside them (TRL's loss types,
    sequence-level ratios, entropy masks and bonuses, truncation masks, Liger's fused loss, ...) would train
    something other than what the recipe says. Their defaults are accepted. Cheap: call it before the model loads.
    """
    problems = []
    for name, ignored, fix in _IGNORED_GRPO_OPTIONS:
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if ignored(value):
            problems.append(f"{name}={value!r} is not supported by MemTrainer: {fix}")
    if problems:
        raise PreflightError("; ".join(problems) + ".")


VLLM_QUANTIZATIONS = ("fp8",)


def check_vllm_lora_sync(args: Any, peft: bool | None) -> None:
    """Refuse ``vllm_lora_sync`` / ``vllm_quantization`` settings that cannot run, before the model loads.

    ``peft``: whether the policy gets a LoRA adapter (``use_peft``, or a ``peft_config`` passed in code); None when
    not known yet (a published adapter may be the model), which skips that check.
    """
    lora_sync = bool(getattr(args, "vllm_lora_sync", False))
    quantization = getattr(args, "vllm_quantization", None)
    if quantization is not None and quantization not in VLLM_QUANTIZATIONS:
        raise PreflightError(
            f"vllm_quantization={quantization!r} is not supported: use fp8, or remove it (the compute dtype)."
        )
    if not lora_sync:
        if quantization is not None:
            raise PreflightError(
                f"vllm_quantization={quantization!r} needs vllm_lora_sync: true (merged weights are pushed in the "
                "compute dtype into a dense engine); set vllm_lora_sync: true, or remove vllm_quantization."
            )
        return
    if not getattr(args, "use_vllm", False):
        raise PreflightError("vllm_lora_sync is set but use_vllm is false; set use_vllm: true, or remove it.")
    if peft is False:
        raise PreflightError(
            "vllm_lora_sync syncs a LoRA adapter but the policy has none: set use_peft: true, or vllm_lora_sync: false."
        )
    if getattr(args, "vllm_mode", "colocate") == "server" and quantization is not None:
        raise PreflightError(
            f"vllm_quantization={quantization!r} configures the colocated engine; in server mode the server loads the "
            f"base: start it with `--quantization {quantization}` and pass --vllm_quantization none."
        )
