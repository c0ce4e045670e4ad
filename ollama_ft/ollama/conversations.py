"""The fidelity conversation set, and the message list Ollama hands a TEMPLATE for a conversation."""

from __future__ import annotations

from dataclasses import dataclass

# ------------------------------------------------------------------------------------------
# Conversations and the Ollama view of them


@dataclass(frozen=True)
class Conversation:
    """A test conversation. `system` is a Modelfile SYSTEM (Ollama prepends it). The last message is a
    user message (rendered with the generation prompt) or an assistant message (a prefill)."""

    name: str
    messages: tuple[tuple[str, str], ...]
    system: str | None = None

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    @property
    def prefill(self) -> bool:
        return bool(self.messages) and self.messages[-1][0] == "assistant"


def _conv(name: str, *msgs: tuple[str, str], system: str | None = None) -> Conversation:
    return Conversation(name, tuple(msgs), system)


CONVERSATIONS: tuple[Conversation, ...] = (
    _conv("user only", ("user", "What time does the clinic open?")),
    _conv("system + user", ("system", "You are a concise clinic assistant."), ("user", "Where is room 4?")),
    _conv("multi-turn with system",
          ("system", "Answer in one sentence."), ("user", "Hello"), ("assistant", "Hello! How can I help?"),
          ("user", "Is the ward open at night?"), ("assistant", "Yes, with a nurse on call."),
          ("user", "Thanks. And on Sunday?")),
    _conv("multi-turn without system",
          ("user", "Two plus two?"), ("assistant", "Four."), ("user", "Times three?")),
    _conv("consecutive same-role messages",
          ("system", "Be brief."), ("system", "Use metric units."), ("user", "How tall is the desk?"),
          ("user", "In cm please."), ("assistant", "About 75 cm."), ("assistant", "Give or take."),
          ("user", "And the chair?")),
    _conv("unicode",
          ("system", "Réponds en français 🙂 — «merci»"), ("user", "日本語で答えて: 東京はどこ? Ünïcödé ß ñ é"),
          ("assistant", "東京は日本にあります。🗼 مرحبا עברית"), ("user", "e\u0301 combining, zero\u200bwidth, 𝔘𝔫𝔦")),
    _conv("empty contents", ("system", ""), ("user", ""), ("assistant", ""), ("user", "")),
    _conv("whitespace at the edges",
          ("system", "  padded system \n"), ("user", "\n\t  spaced question?  \n"),
          ("assistant", " \u00a0answer with nbsp\u3000 "), ("user", "\r\nline one\r\nline two\r\n")),
    _conv("earlier reasoning block",
          ("user", "What is 17 * 3?"),
          ("assistant", "<think>\n17 * 3 = 51.\n</think>\n\nIt is 51."), ("user", "And 17 * 4?")),
    _conv("template-looking text",
          ("user", "Is {{ .Content }} or {% if x %} or $last or \\n literal? \"quoted\" 'single' <tag> & %s"),
          ("assistant", "They are plain text: {{ end }} }} {{"), ("user", "OK {{- .System -}}")),
    _conv("Modelfile SYSTEM prepended", ("user", "Which form do I sign?"),
          system="You answer questions about the clinic."),
    _conv("Modelfile SYSTEM with own system message", ("system", "Overriding system."), ("user", "Hi"),
          system="Stored system that Ollama must not add."),
    _conv("system later in the conversation",
          ("user", "Hi"), ("assistant", "Hello."), ("system", "From now on answer in German."),
          ("user", "How are you?")),
    _conv("prefill of the assistant turn", ("system", "Be helpful."), ("user", "List three colours."),
          ("assistant", "1. Red\n2.")),
    # What Ollama sends the TEMPLATE when a chat outgrows num_ctx: it drops the oldest messages but keeps
    # system ones (server/prompt.go), so the history can start with an assistant turn.
    _conv("history after truncation",
          ("system", "Answer from the clinic protocols."), ("assistant", "The ward opens at 7:40."),
          ("user", "And when does it close?"), ("assistant", "At 18:20."), ("user", "Thanks. Saturdays?")),
    _conv("long multi-line content",
          ("user", "Format this:\n```python\ndef f(x):\n    return x * 2\n```\n" + "word " * 200),
          ("assistant", "Done:\n\n```python\ndef f(x):\n    return 2 * x\n```"), ("user", "Thanks!")),
)


def ollama_view(conv: Conversation | list[dict[str, str]], system: str | None = None) -> list[dict[str, str]]:
    """The messages as Ollama's template sees them: stored SYSTEM prepended when the first message is
    not a system one, roles lower-cased, consecutive same-role messages (except tool) merged with "\\n\\n"."""
    if isinstance(conv, Conversation):
        msgs, system = conv.as_dicts(), conv.system
    else:
        msgs = [dict(m) for m in conv]
    msgs = [{"role": str(m["role"]).lower(), "content": m.get("content") or ""} for m in msgs]
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    out: list[dict[str, str]] = []
    for m in msgs:
        if out and out[-1]["role"] == m["role"] and m["role"] != "tool":
            out[-1]["content"] += "\n\n" + m["content"]
        else:
            out.append(dict(m))
    return out
