"""The behaviour prompt: a session serialised as the intent model reads it.

RecGPT-style compressed behaviour: one line per event, an action tag, the item or query
text and how long ago, newest last. The lines go inside the model's chat template with a
fixed instruction (or a template of the recipe's own, with ``{behaviours}`` and
``{prefix}``), and the oldest lines are dropped until the whole prompt fits the token
budget (the newest is always kept).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

ACTION_TAGS = {"search": "搜索", "click": "点击", "cart": "加购", "buy": "购买", "favorite": "收藏"}
INSTRUCTION = "你是购物助手。根据用户最近的行为，预测用户接下来会搜索的内容，只输出搜索词。"
CHAT = "chat"  # the tokenizer's own chat template
AUTO_PREFIX = "auto"  # the cached prefix: what every prompt of the format starts with
NO_PREFIX = "off"
# Two behaviour histories that differ from their first character on (and one with a typed
# prefix): the ids their prompts share are the fixed part of the format.
_PROBES = ((["[搜索] 手机壳"], ""), (["[点击] Nike 跑步鞋 男 (3分钟前)", "[购买] 蓝牙耳机"], "跑"))


@dataclass(frozen=True, kw_only=True)
class PromptFormat:
    template: str = CHAT  # "chat", or a text with {behaviours} (and optionally {prefix})
    instruction: str = INSTRUCTION
    budget: int = 192  # prompt tokens at most (the shipped intent adapter was trained at 192)

    @classmethod
    def of(cls, task) -> PromptFormat:
        """The format a recipe's [task] section (spec.TaskSpec) names."""
        return cls(template=task.template, instruction=task.instruction or INSTRUCTION, budget=task.budget)


def encoder(tokenizer) -> Callable[[str], list[int]]:
    """A transformers tokenizer's ids for a prompt text, no special tokens added (the chat
    template wrote its own)."""
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def recency(seconds: int | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds}秒前"
    if seconds < 3600:
        return f"{seconds // 60}分钟前"
    return f"{seconds // 3600}小时前"


def behaviour_line(event: dict) -> str:
    tag = ACTION_TAGS.get(event["action"], event["action"])
    when = recency(event.get("t"))
    return f"[{tag}] {event['text']}" + (f" ({when})" if when else "")


def render(lines: Sequence[str], prefix: str, fmt: PromptFormat, apply_chat_template: Callable | None) -> str:
    behaviours = "\n".join(lines)
    if fmt.template != CHAT:
        return fmt.template.format(behaviours=behaviours, prefix=prefix)
    user = "用户最近的行为（从旧到新）：\n" + behaviours + (f"\n已输入：{prefix}" if prefix else "")
    messages = [{"role": "system", "content": fmt.instruction}, {"role": "user", "content": user}]
    return apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def build_prompt(session: dict, fmt: PromptFormat, *, encode: Callable[[str], list[int]],
                 apply_chat_template: Callable | None = None) -> tuple[str, int]:
    """The prompt text for ``session`` and how many of its events it kept (the newest ones)."""
    lines = [behaviour_line(e) for e in session["behaviours"]]
    prefix = session.get("prefix", "")

    def text_of(kept: int) -> str:
        return render(lines[len(lines) - kept:], prefix, fmt, apply_chat_template)

    # The most recent events that fit (binary search: a long history costs log2(n) encodes).
    low, high = 1, max(1, len(lines))
    while low < high:
        middle = (low + high + 1) // 2
        if len(encode(text_of(middle))) <= fmt.budget:
            low = middle
        else:
            high = middle - 1
    return text_of(low), low


def fixed_prefix_ids(setting: str, fmt: PromptFormat, *, encode: Callable[[str], list[int]],
                     apply_chat_template: Callable | None) -> list[int]:
    """The prompt prefix an artifact keeps in its KV cache (recipe ``task.cached_prefix``):
    "auto", the ids every prompt of ``fmt`` starts with (the template and instruction before
    the first behaviour line, as tokenized inside a whole prompt, so a token that would merge
    across the boundary is left out); "off", none; any other text, that text's ids."""
    if setting == NO_PREFIX:
        return []
    if setting != AUTO_PREFIX:
        return encode(setting)
    if fmt.template == CHAT and apply_chat_template is None:
        return []
    return list(os.path.commonprefix([encode(render(lines, typed, fmt, apply_chat_template))
                                      for lines, typed in _PROBES]))


def chat_template_of(tokenizer) -> Callable | None:
    """A transformers tokenizer's apply_chat_template, or None when it has no template."""
    return tokenizer.apply_chat_template if getattr(tokenizer, "chat_template", None) else None


def cached_prefix_ids(task, tokenizer) -> list[int]:
    """``fixed_prefix_ids`` for a recipe's [task] section and a transformers tokenizer."""
    return fixed_prefix_ids(task.cached_prefix, PromptFormat.of(task), encode=encoder(tokenizer),
                            apply_chat_template=chat_template_of(tokenizer))


def behaviour_prompt_ids(sessions: Sequence[dict], task, tokenizer, *, fits: int | None = None) -> list[list[int]]:
    """The prompt ids of each session in the format a recipe's [task] section names; ``fits``:
    at most this many tokens (an artifact's cache), whatever the format's budget (a session
    whose newest event alone is longer is left out)."""
    fmt, encode, template = PromptFormat.of(task), encoder(tokenizer), chat_template_of(tokenizer)
    if fmt.template == CHAT and template is None:
        from exporter.errors import UsageError

        raise UsageError('task.template = "chat", and the tokenizer has no chat template',
                         hint='set task.template to a text with {behaviours}, e.g. "行为：{behaviours}\n下一个搜索："')
    if fits is not None and fits < fmt.budget:
        fmt = replace(fmt, budget=fits)
    prompts = [encode(build_prompt(session, fmt, encode=encode, apply_chat_template=template)[0])
               for session in sessions]
    return [p for p in prompts if fits is None or len(p) <= fits]
