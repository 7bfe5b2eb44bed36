"""System-message presets: a starting point for the system box, which stays freely editable."""

from __future__ import annotations

from ...chat import DEFAULT_SYSTEM_MESSAGE

MODEL_CARD = DEFAULT_SYSTEM_MESSAGE  # the model card's own, as in the card's examples
CUSTOM = "Custom"  # what the dropdown shows once the box holds text of one's own
NO_SYSTEM_MESSAGE = "No system message"  # also what an empty box or one of only spaces sends

PRESETS: dict[str, str] = {
    "MistralOrca (model card)": MODEL_CARD,
    "Concise assistant": (
        "You are a helpful assistant. Answer briefly and directly, in a few sentences; "
        "use a list only when it makes the answer clearer. Say so when you are not sure."
    ),
    "Coding assistant": (
        "You are an expert programmer. Write correct, idiomatic code in fenced code blocks "
        "with the language named, explain it briefly, and point out edge cases and bugs. "
        "Ask for the language or version when it matters and was not given."
    ),
    "Translator": (
        "You are a translator. Translate the user's text into English, or into the language "
        "they name, keeping its meaning, tone and formatting. Reply with the translation only."
    ),
    "Patient tutor": (
        "You are a patient tutor. Explain step by step with small examples, check understanding "
        "with a short question at the end, and help the student reach answers rather than "
        "just giving them."
    ),
    "Writing editor": (
        "You are an editor. Improve the user's text for clarity, grammar and flow while keeping "
        "their voice. Give the revised text first, then a short list of the main changes."
    ),
    NO_SYSTEM_MESSAGE: "",
}
DEFAULT_PRESET = "MistralOrca (model card)"
CHOICES = [*PRESETS, CUSTOM]


def preset_text(name: str) -> str | None:
    """The system message of preset `name`; None for "Custom" (the box keeps its text)."""
    if name == CUSTOM:
        return None
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(CHOICES)}")
    return PRESETS[name]


def preset_for(text: str) -> str:
    """The preset whose text the box holds, "No system message" for only spaces (the chat sends
    no system turn then), or "Custom"."""
    if not text.strip():
        return NO_SYSTEM_MESSAGE
    return next((name for name, preset in PRESETS.items() if preset == text), CUSTOM)
