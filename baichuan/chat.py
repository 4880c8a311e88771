"""The terminal chat (`baichuan chat`): streaming answers, multi-turn history, /clear, /exit, multi-line input,
and Ctrl-C that stops the current answer without leaving. The KV cache of earlier turns is re-used."""

from __future__ import annotations

import threading
import warnings

from rich.console import Console

from baichuan.generate import ChatSession, SamplingConfig
from baichuan.runtime import Loaded

HELP = (
    "Type a message and press Enter. End a line with \\ to continue on the next line, or start and end a "
    'block with """ for pasted text.\n/clear forgets the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops '
    "an answer."
)


# C0 controls but newline and tab, DEL, and the C1 controls: as text, a model's answer (a byte-fallback token can
# be any of them) could move the cursor, clear the screen or open an escape sequence that swallows what follows.
_CONTROLS = {c: chr(0x2400 + c) for c in range(0x20) if chr(c) not in "\n\t"} | {0x7F: "\u2421"}
_CONTROLS |= {c: "\ufffd" for c in range(0x80, 0xA0)}


def terminal_safe(text: str) -> str:
    """`text` to show on a terminal: each control character (ESC, BEL, CR, ...) as its visible symbol (␛, ␇, ␍;
    U+FFFD for the C1 range), so that model output shows as text and never acts on the terminal."""
    return text.translate(_CONTROLS)


def read_message(console: Console) -> str | None:
    """One user message (possibly multi-line); None at end of input."""
    try:
        line = console.input("[bold cyan]User:[/] ")
    except EOFError:
        return None
    if line.strip() == '"""':
        lines = []
        while True:
            try:
                more = console.input("")
            except EOFError:
                break
            if more.strip() == '"""':
                break
            lines.append(more)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        try:
            line = console.input("[dim]...[/] ")
        except EOFError:
            break
    lines.append(line)
    return "\n".join(lines)


def not_utf8(text: str) -> str | None:
    """Why `text` is not valid UTF-8, or None. Input read with errors="surrogateescape" keeps each byte that
    does not decode as a lone surrogate; sending one to the tokenizer would fail, so the REPL refuses it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) - 0xDC00 if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
        where = f"byte {byte:#04x}" if byte is not None else f"character {ord(text[e.start]):#x}"
        return f"not valid UTF-8 ({where} at character {e.start})"
    return None


def run(
    loaded: Loaded, sampling: SamplingConfig, system: str | None = None, console: Console | None = None
) -> None:
    console = console or Console()
    session = ChatSession(loaded.model, loaded.tokenizer, loaded.chat_format, sampling, loaded.kv_dtype)
    history: list[dict[str, str]] = []
    console.print(f"[dim]{loaded.note}[/]")
    console.print(f"[dim]{HELP}[/]")
    while True:
        try:
            message = read_message(console)
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-C stops an answer; /exit or Ctrl-D leaves)[/]")
            continue
        except UnicodeDecodeError as e:  # a terminal or pipe sending another encoding
            console.print(
                f"[bold red]error:[/] that message is not valid UTF-8 ({e.reason}); it was not sent"
            )
            continue
        problem = None if message is None else not_utf8(message)
        if problem:
            console.print(f"[bold red]error:[/] that message is {problem}; it was not sent")
            continue
        if message is None or message.strip() == "/exit":
            console.print("[dim]bye[/]")
            return
        if message.strip() == "/clear":
            history.clear()
            session.reset()
            console.print("[dim]conversation cleared[/]")
            continue
        if not message.strip():
            continue
        history.append({"role": "user", "content": message})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        cancel = threading.Event()
        answer = ""
        console.print("[bold green]Baichuan:[/] ", end="")
        try:
            with warnings.catch_warnings(record=True) as notes:
                warnings.simplefilter("always")
                for delta in session.chat(messages, stream=True, cancel=cancel):
                    answer += delta
                    console.print(terminal_safe(delta), end="", markup=False, highlight=False, soft_wrap=True)
            for note in notes:  # e.g. the answer cut to the context the conversation leaves
                console.print(f"\n[dim]({note.message})[/]", end="")
        except KeyboardInterrupt:
            cancel.set()
            console.print(" [dim](stopped)[/]", end="")
        except ValueError as e:  # e.g. a conversation that no longer fits the context
            history.pop()
            console.print(f"\n[bold red]error:[/] {e}")
            continue
        console.print()
        history.append({"role": "assistant", "content": answer})
