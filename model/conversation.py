"""Conversation templates (VILA `vicuna_v1`) and UniRS prompt construction.

The generation prompt for one question is

    "{system} USER: <image>\\n{instruction} ASSISTANT:"

with one `<image>\\n` per visual block (1 for an image or a pair, `num_video_frames` for a video).
With prompt augmentation the instruction becomes (configurable, spec section 4 [I])

    "<clue>{clue}</clue>\\n{task_tag} {instruction}"
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from .configuration_unirs import DEFAULT_SYSTEM_PROMPT, InputType, UniRSConfig

__all__ = [
    "Conversation",
    "build_augmented_instruction",
    "build_clue_prompt",
    "build_prompt",
    "clean_clue",
    "get_conversation_template",
]


@dataclass
class Conversation:
    """VILA `Conversation` restricted to the TWO separator style used by `vicuna_v1`."""

    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    messages: list[list[str | None]] = field(default_factory=list)
    sep: str = " "
    sep2: str = "</s>"

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def get_prompt(self) -> str:
        seps = (self.sep, self.sep2)
        out = self.system + seps[0]
        for i, (role, message) in enumerate(self.messages):
            if message:
                out += f"{role}: {message}{seps[i % 2]}"
            else:
                out += f"{role}:"
        return out

    def copy(self) -> Conversation:
        return copy.deepcopy(self)


def get_conversation_template(name: str = "vicuna_v1", system: str | None = None) -> Conversation:
    if name not in ("vicuna_v1", "v1"):
        raise KeyError(f"Unknown conversation template {name!r}; only 'vicuna_v1' is used by VILA-1.5-3B/UniRS")
    return Conversation(system=DEFAULT_SYSTEM_PROMPT if system is None else system)


def build_prompt(instruction: str, num_images: int, config: UniRSConfig) -> str:
    """Full generation prompt: placeholders, then the instruction, then "ASSISTANT:".

    The instruction is stripped: a leading space would be tokenised differently by the fast
    LLaMA tokenizer and by the slow SentencePiece one VILA used.
    """
    conv = get_conversation_template(config.conv_template, system=config.system_prompt)
    conv.append_message(conv.roles[0], (config.image_token + "\n") * num_images + instruction.strip())
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def clean_clue(text: str, config: UniRSConfig) -> str:
    """Make a generated clue safe to embed: no markers, no `<image>`, single-line whitespace."""
    for token in (config.clue_open, config.clue_close, config.image_token, "</s>", "<s>"):
        if token:
            text = text.replace(token, " ")
    return re.sub(r"\s+", " ", text).strip()


def build_augmented_instruction(
    instruction: str, clue: str | None, input_type: InputType | str, config: UniRSConfig
) -> str:
    """Merge clue, markers and task tag with the task instruction; unchanged when `clue` is None."""
    if clue is None:
        return instruction.strip()
    return config.augmented_instruction_template.format(
        clue_open=config.clue_open,
        clue=clean_clue(clue, config),
        clue_close=config.clue_close,
        task_tag=config.task_tags[InputType(input_type).value],
        instruction=instruction.strip(),
    ).strip()


def build_clue_prompt(input_type: InputType | str, num_images: int, config: UniRSConfig) -> str:
    """Pass-1 prompt for the base VLM with the per-input-type clue instruction P_g."""
    return build_prompt(config.clue_prompts[InputType(input_type).value], num_images, config)
