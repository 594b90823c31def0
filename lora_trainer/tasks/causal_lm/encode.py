"""Samples -> token ids plus, per token, whether the loss is computed on it.

Chats go through the model's chat template when it has one (else a plain `role: content` layout).
Which tokens are trained is decided on characters, then mapped to tokens by the tokenizer's offsets:
the template renders the conversation up to each assistant turn (with the generation prompt) and up
to its end, and the characters in between are that turn's answer. A template that does not render
a conversation as the extension of its prefix cannot be masked this way: that is reported as a
template error, naming the sample.
"""
from __future__ import annotations

from dataclasses import dataclass

from .records import LMDataError, RawSample, raise_problems


@dataclass(frozen=True)
class TokenizedSample:
    source: str                  # "file:line"
    input_ids: tuple
    trainable: tuple             # per token: is it a loss target (predicted from the tokens before)
    original_length: int         # before truncation
    repeats: int = 1             # the plan's record interface (every sample is used once per epoch)

    @property
    def truncated(self) -> bool:
        return self.original_length > len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(self.trainable)


class Encoder:
    def __init__(self, tokenizer, train_on: str, max_seq_length: int, overlong: str):
        self.tokenizer = tokenizer
        self.train_on, self.max_seq_length, self.overlong = train_on, max_seq_length, overlong
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    # ---- text and trained character spans ------------------------------------------------------
    def _render(self, messages, generation_prompt: bool = False) -> str:
        if self.has_template:
            return self.tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in messages], tokenize=False,
                add_generation_prompt=generation_prompt)
        bos = self.tokenizer.bos_token or ""
        text = bos + "".join(f"{role}: {content}\n" for role, content in messages)
        return text + ("assistant: " if generation_prompt else "")

    def _chat(self, sample: RawSample) -> tuple[str, list[tuple[int, int]], bool]:
        messages = sample.messages
        try:
            text = self._render(messages)
            spans = []
            for i, (role, _) in enumerate(messages):
                if role != "assistant":
                    continue
                before = self._render(messages[:i], generation_prompt=True)
                through = self._render(messages[:i + 1])
                if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
                    raise LMDataError(f"the chat template does not render message {i} as an extension of the "
                                      "conversation before it, so its answer tokens cannot be found")
                spans.append((len(before), len(through)))
        except LMDataError:
            raise
        except Exception as error:   # noqa: BLE001 - jinja raises anything (e.g. raise_exception)
            raise LMDataError(f"chat template error: {type(error).__name__}: {error}") from error
        # the template places bos/eos itself
        return text, spans, False

    def _text_and_spans(self, sample: RawSample) -> tuple[str, list[tuple[int, int]], bool]:
        """(text, trained character spans, wrap in bos/eos)."""
        if sample.kind == "messages":
            return self._chat(sample)
        if sample.kind == "prompt":
            text = sample.prompt + sample.completion
            return text, [(len(sample.prompt), len(text))], True
        return sample.text, [(0, len(sample.text))], True

    # ---- tokens ---------------------------------------------------------------------------------
    def encode(self, sample: RawSample) -> TokenizedSample:
        text, spans, wrap = self._text_and_spans(sample)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
        # a token is trained when it holds any trained character: byte-level BPE glues the space
        # that ends a prompt to the completion's first word, which must still be learned
        trainable = [self.train_on == "all" or any(start < b and end > a for a, b in spans)
                     for start, end in offsets]
        if wrap:
            tok = self.tokenizer
            if tok.bos_token_id is not None:
                ids, trainable = [tok.bos_token_id, *ids], [False, *trainable]
            # a completion / text runs to the end, so its end is trained too: the model learns to stop
            if tok.eos_token_id is not None:
                ids, trainable = [*ids, tok.eos_token_id], [*trainable, True]
        if trainable:
            trainable[0] = False   # nothing predicts the first token
        original = len(ids)
        if original > self.max_seq_length:
            if self.overlong == "fail":
                raise LMDataError(f"{original} tokens, longer than max_seq_length {self.max_seq_length}; "
                                  "raise max_seq_length, shorten the sample, or set overlong_samples: truncate")
            ids, trainable = ids[:self.max_seq_length], trainable[:self.max_seq_length]
        if not any(trainable):
            raise LMDataError("no token to learn from (empty, or all of it is prompt"
                              + (" after truncation to max_seq_length" if original > len(ids) else "") + ")")
        return TokenizedSample(sample.source, tuple(ids), tuple(trainable), original)


def encode_each(encoder: Encoder, samples: list[RawSample]) -> tuple[list[TokenizedSample], list[str]]:
    """(the encoded samples, a 'file:line: what' per sample that failed)."""
    out, problems = [], []
    for sample in samples:
        try:
            out.append(encoder.encode(sample))
        except LMDataError as problem:
            problems.append(f"{sample.source}: {problem}")
    return out, problems


def encode_all(encoder: Encoder, samples: list[RawSample]) -> list[TokenizedSample]:
    """Every sample encoded; all problems reported together, each naming its file and line."""
    out, problems = encode_each(encoder, samples)
    raise_problems(problems)
    return out
