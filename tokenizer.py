"""The vocabulary's special tokens, the chat format (the template, and chat rows read from either
`messages` or the seed's tagged text), and the tokenizer: trained on the corpus (byte-level BPE) or
loaded from a published model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from errors import BadInput


BOS, EOS, PAD, UNK = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|unk|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *ROLE_TOKENS.values(), END_OF_TURN]

# Turns end with <|end|>, except the assistant's, which ends with the tokenizer's EOS: generation
# stops there by itself. A tokenizer given by TOKENIZER that has no template gets this one (its
# markers are then plain text, so the vocabulary, and a BASE_MODEL's embeddings, stay as they are). The {% generation %} block marks the tokens that carry the instruct loss (the answer and
# its EOS), which `apply_chat_template(return_assistant_tokens_mask=True)` reads back.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)
# The seed format of instruct rows: <|user|>…<|end|><|bot|>…<|end|> (bot = assistant).
SEED_TURN = re.compile(r"<\|(system|user|bot|assistant)\|>(.*?)<\|end\|>", re.S)


CHAT_ROW_FIX = ("Fix: each row needs 'messages': [{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": \"...\"}, ...] "
                "with at least one assistant turn, or a 'text' of <|user|>...<|end|><|bot|>...<|end|> turns.")


def to_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A chat row as HF messages: from `messages` (role/content list) or the seed's tagged `text`."""
    try:
        return _to_messages(row, where)
    except BadInput as e:
        raise BadInput([f"{p} {CHAT_ROW_FIX}" for p in e.problems]) from None


def _to_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    if "messages" in row and row["messages"] is not None:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise BadInput([f"{where}: 'messages' must be a list of {{role, content}} objects, got {type(msgs).__name__}."])
        out = []
        for j, m in enumerate(msgs):
            role, content = m.get("role"), m.get("content")
            if role not in ROLE_TOKENS:
                raise BadInput([f"{where}: message {j} has role {role!r}; accepted roles: system, user, assistant."])
            if not isinstance(content, str):
                raise BadInput([f"{where}: message {j} has no text 'content'."])
            out.append({"role": role, "content": content})
    elif isinstance(row.get("text"), str):
        out = [{"role": "assistant" if r == "bot" else r, "content": c.strip()} for r, c in SEED_TURN.findall(row["text"])]
        if not out:
            raise BadInput([f"{where}: 'text' has no <|user|>…<|end|><|bot|>…<|end|> turns."])
    else:
        raise BadInput([f"{where}: neither a 'messages' list nor a tagged 'text' field."])
    if not any(m["role"] == "assistant" for m in out):
        raise BadInput([f"{where}: no assistant turn, nothing to learn from."])
    return out


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int):
    """Byte-level BPE with the special tokens and the chat template, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                 additional_special_tokens=[*ROLE_TOKENS.values(), END_OF_TURN],
                                 model_max_length=max_length, padding_side="right")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def load_tokenizer(path: Path, where: str):
    """A published tokenizer; one that does not load is bad input naming where it came from."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers/tokenizers raise many types for a damaged file
        raise BadInput([f"{where}: the tokenizer does not load ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). "
                        "Fix: restore tokenizer.json / tokenizer_config.json there (they are published with the model), "
                        "or republish the model."]) from None


TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "*.model",
                   "vocab.*", "merges.txt"]
