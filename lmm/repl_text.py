"""Text helpers of the REPL that need no terminal: input blocks, control characters, word wrap.

Owns how a `\"\"\"` block is recognised and unwrapped, how untrusted model output is made safe to
print (control characters shown as symbols), wrapping streamed text at word boundaries, and
clipping a statement quoted on the stats line.
"""

from __future__ import annotations

from rich.cells import cell_len

BLOCK = '"""'

# Model output is untrusted: show control characters (escape sequences!) as visible symbols.
_CONTROL = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"}
_CONTROL.update({0x7F: 0x2421, **{c: 0xFFFD for c in range(0x80, 0xA0)}})


def clean(text: str) -> str:
    return text.translate(_CONTROL)


def clip(text: str, width: int = 48) -> str:
    """`text` cut to `width` characters, an ellipsis marking the cut."""
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def block_open(text: str) -> bool:
    """True while the input is a `\"\"\"` block that has not been closed yet."""
    body = text.strip()
    return body.startswith(BLOCK) and (len(body) < 2 * len(BLOCK) or not body.endswith(BLOCK))


def unwrap_block(text: str) -> str:
    """The message inside a `\"\"\"` block (delimiters removed); other input just stripped."""
    body = text.strip()
    if body.startswith(BLOCK):
        body = body[len(BLOCK):]
        if body.endswith(BLOCK):
            body = body[: -len(BLOCK)]
    return body.strip()


class WordWrap:
    """Wrap streamed text at word boundaries: whole words are held until they are complete.

    A word that cannot fit on any line is written as it comes (the terminal folds it).
    """

    def __init__(self, width: int) -> None:
        self.width = max(width, 10)
        self.column = 0
        self.word = ""

    def feed(self, text: str) -> str:
        out: list[str] = []
        for ch in text:
            if ch == "\n":
                out.append(self.flush() + "\n")
                self.column = 0
            elif ch.isspace():
                out.append(self.flush())
                if self.column >= self.width:
                    out.append("\n")
                    self.column = 0
                else:
                    out.append(ch)
                    self.column += cell_len(ch)
            else:
                self.word += ch
                if cell_len(self.word) >= self.width:  # longer than a line: stop holding it back
                    out.append(self.flush())
        return "".join(out)

    def flush(self) -> str:
        word, self.word = self.word, ""
        size = cell_len(word)
        prefix = ""
        if self.column and self.column + size > self.width:
            prefix, self.column = "\n", 0
        self.column = (self.column + size) % self.width if size >= self.width else self.column + size
        return prefix + word
