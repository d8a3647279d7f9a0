"""The `gradsift:` block of an axolotl YAML, merged into axolotl's config schema by `GradSiftPlugin.get_input_args`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from gradsift.config import GradSiftConfig, format_validation_error

# axolotl settings under which gradsift cannot score the rows that will be trained, with the fix for each.
UNSUPPORTED = {
    "rl": "preference training (`rl:`) is not supported by gradsift's scoring; remove `rl:` or the gradsift plugin.",
    "skip_prepare_dataset": "gradsift scores the prepared dataset; set `skip_prepare_dataset: false`.",
    "pretraining_dataset": "streamed `pretraining_dataset:` rows cannot be scored before training; use `datasets:`.",
}


class AxolotlGradSiftConfig(GradSiftConfig):
    """gradsift's options inside axolotl. Scoring defaults follow the axolotl config (base model, `lora_*`)."""

    cache_dir: str | None = Field(
        None,
        description="Folder for scores.parquet, scores.json, dropped.jsonl and selection.json. Default: "
        "`<dataset_prepared_path>/gradsift` (axolotl's default prepared path is `last_run_prepared`).",
    )


class GradSiftArgs(BaseModel):
    """Fields gradsift adds to axolotl's config: the nested `gradsift:` block."""

    gradsift: AxolotlGradSiftConfig | None = Field(
        None, description="gradsift's gradient-based sample selection; see the plugin README."
    )

    @field_validator("gradsift", mode="before")
    @classmethod
    def _validate_block(cls, value: Any) -> Any:
        if value is None or isinstance(value, AxolotlGradSiftConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"`gradsift` must be a mapping of options; got {type(value).__name__}.")
        if "data" in value:
            raise ValueError(
                "`gradsift.data` does not apply under axolotl: axolotl tokenizes the rows itself (set `sequence_len`, "
                "the dataset `type:` and `train_on_inputs` instead). Remove `gradsift.data`."
            )
        try:
            return AxolotlGradSiftConfig.model_validate(value)
        except ValidationError as error:
            raise ValueError(format_validation_error(error, prefix="gradsift")) from None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported_settings(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("gradsift") is not None:
            for key, reason in UNSUPPORTED.items():
                if data.get(key):
                    raise ValueError(f"`{key}` is set ({data[key]!r}), but {reason}")
            block = data["gradsift"]
            mode = block.get("mode") if isinstance(block, dict) else getattr(block, "mode", None)
            if mode == "online" and data.get("sample_packing"):
                raise ValueError(
                    "`gradsift.mode: online` scores each row of a training batch on its own, but `sample_packing` "
                    "joins rows into packed sequences. Set `sample_packing: false`, or use `gradsift.mode: offline`."
                )
        return data
