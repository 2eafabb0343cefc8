"""Behaviour sessions of a Taobao-like shop, generated from a seed: the intent workload's data.

A session is what one user did before typing a query (search, click, add-to-cart, buy,
favourite), newest last, and the query they typed next. The next query follows from the
behaviour by rules a model can learn and a lookup cannot, because the same rule applies to
every category, brand and attribute:

- refinement: a search, then clicks on items sharing an attribute -> the search plus that
  attribute ("跑步鞋" -> "跑步鞋 男 缓震");
- complement: a purchase -> the category that goes with it, for the bought brand where it
  makes one ("Apple 手机" bought -> "Apple 手机壳");
- brand switch: a search for one brand, then favourites of another -> that brand and the
  category ("Nike 跑步鞋" ... favourites of 李宁 -> "李宁 跑步鞋");
- price: clicks on the cheapest of a category's items -> the category plus "平价" or, on
  the dearest, "高端".

Product titles are mostly Chinese, with English brand names and the odd emoji, as listings
are. ``generate(seed, n)`` is deterministic (its own ``random.Random``); ``split`` gives a
train and an eval set from disjoint seeds, so they share no session.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACTIONS = ("search", "click", "cart", "buy", "favorite")

# category -> (brands, attribute groups, price range in yuan, its complement category)
CATALOG: dict[str, tuple[tuple[str, ...], tuple[tuple[str, ...], ...], tuple[int, int], str]] = {
    "跑步鞋": (("Nike", "Adidas", "李宁", "安踏", "ASICS"), (("男", "女"), ("缓震", "透气", "轻便"), ("黑色", "白色")),
            (199, 1299), "运动袜"),
    "手机": (("Apple", "华为", "小米", "OPPO", "vivo"), (("5G", "长续航"), ("256G", "512G"), ("黑色", "白色", "蓝色")),
           (999, 8999), "手机壳"),
    "笔记本电脑": (("联想", "华为", "Apple", "戴尔"), (("轻薄", "游戏本"), ("16G", "32G"), ("14寸", "16寸")),
              (2999, 15999), "电脑包"),
    "咖啡机": (("德龙", "飞利浦", "小熊"), (("全自动", "半自动"), ("家用", "商用")), (299, 6999), "咖啡豆"),
    "相机": (("Sony", "佳能", "富士", "尼康"), (("微单", "单反"), ("4K", "防抖")), (2999, 19999), "存储卡"),
    "连衣裙": (("优衣库", "ZARA", "太平鸟"), (("夏季", "秋冬"), ("碎花", "纯色"), ("长款", "短款")),
            (99, 899), "凉鞋"),
    "面霜": (("兰蔻", "雅诗兰黛", "珀莱雅", "薇诺娜"), (("保湿", "修护", "美白"), ("敏感肌", "干皮")),
           (99, 1599), "面膜"),
    "耳机": (("Sony", "Apple", "华为", "漫步者"), (("降噪", "运动"), ("无线", "头戴式")), (99, 2999), "耳机套"),
    "猫粮": (("皇家", "渴望", "网易严选"), (("幼猫", "成猫"), ("无谷", "鱼肉")), (59, 699), "猫砂"),
    "电动牙刷": (("飞利浦", "欧乐B", "小米"), (("声波", "旋转"), ("美白", "护龈")), (99, 1299), "牙刷头"),
}
# complements bought for the brand itself (an Apple phone -> an Apple phone case)
BRANDED_COMPLEMENTS = frozenset({"手机壳", "电脑包", "耳机套", "牙刷头"})
DECORATIONS = ("", "", "", "🔥爆款", "✨新品", "官方旗舰店", "包邮", "💯正品")


@dataclass(frozen=True)
class Item:
    category: str
    brand: str
    attributes: tuple[str, ...]
    price: int

    def title(self, rng: random.Random) -> str:
        decoration = rng.choice(DECORATIONS)
        words = [self.brand, self.category, *self.attributes] + ([decoration] if decoration else [])
        return " ".join(words) + f" ¥{self.price}"


def _item(rng: random.Random, category: str, *, brand: str | None = None, must: str | None = None) -> Item:
    brands, groups, (low, high), _ = CATALOG[category]
    attributes = [rng.choice(group) for group in groups if rng.random() < 0.8]
    if must and must not in attributes:
        group = next(g for g in groups if must in g)
        attributes = [a for a in attributes if a not in group] + [must]
    return Item(category, brand or rng.choice(brands), tuple(attributes), rng.randrange(low, high, 10))


def _events(rng: random.Random) -> tuple[list[dict], str]:
    """One session's events (oldest first, without times) and its next query."""
    category = rng.choice(list(CATALOG))
    brands, groups, _, complement = CATALOG[category]
    rule = rng.choice(("refine", "complement", "switch", "price"))
    events: list[dict] = []

    def noise() -> None:  # an unrelated glance at another category: the model must look past it
        other = rng.choice([c for c in CATALOG if c != category])
        events.append({"action": "click", "text": _item(rng, other).title(rng)})

    if rule == "refine":
        base = category if rng.random() < 0.5 else f"{rng.choice(brands)} {category}"
        chosen = [a for a in (rng.choice(g) for g in groups) if rng.random() < 0.7][:2] or [groups[0][0]]
        events.append({"action": "search", "text": base})
        for _ in range(rng.randint(2, 4)):
            item = _item(rng, category, must=chosen[0])
            for attribute in chosen[1:]:
                item = _item(rng, category, brand=item.brand, must=attribute)
                item = Item(item.category, item.brand, tuple(dict.fromkeys((*item.attributes, *chosen))), item.price)
            events.append({"action": rng.choice(("click", "click", "favorite")), "text": item.title(rng)})
            if rng.random() < 0.3:
                noise()
        query = " ".join([base, *chosen])
    elif rule == "complement":
        brand = rng.choice(brands)
        events.append({"action": "search", "text": f"{brand} {category}" if rng.random() < 0.5 else category})
        item = _item(rng, category, brand=brand)
        for _ in range(rng.randint(0, 2)):
            events.append({"action": "click", "text": _item(rng, category).title(rng)})
        events.append({"action": "click", "text": item.title(rng)})
        events.append({"action": "cart", "text": item.title(rng)})
        if rng.random() < 0.3:
            noise()
        events.append({"action": "buy", "text": item.title(rng)})
        query = f"{brand} {complement}" if complement in BRANDED_COMPLEMENTS else complement
    elif rule == "switch":
        first, second = rng.sample(brands, 2)
        events.append({"action": "search", "text": f"{first} {category}"})
        events.append({"action": "click", "text": _item(rng, category, brand=first).title(rng)})
        if rng.random() < 0.4:
            noise()
        for _ in range(rng.randint(2, 3)):
            events.append({"action": "favorite", "text": _item(rng, category, brand=second).title(rng)})
        query = f"{second} {category}"
    else:
        items = [_item(rng, category) for _ in range(rng.randint(3, 5))]
        events.append({"action": "search", "text": category})
        cheap = rng.random() < 0.5
        for item in items:
            events.append({"action": "click", "text": item.title(rng)})
        pick = min(items, key=lambda i: i.price) if cheap else max(items, key=lambda i: i.price)
        events.append({"action": rng.choice(("click", "favorite")), "text": pick.title(rng)})
        query = f"{category} {'平价' if cheap else '高端'}"
    return events, query


def generate(seed: int, count: int, *, prefix: str = "s") -> Iterator[dict]:
    """``count`` sessions in the eval-set format (docs/intent.md), deterministic in ``seed``."""
    rng = random.Random(seed)
    for index in range(count):
        events, query = _events(rng)
        seconds, behaviours = 0, []
        for event in reversed(events):  # times count back from the query
            seconds += rng.choice((5, 20, 45, 90, 240, 900))
            behaviours.append({**event, "t": seconds})
        yield {"id": f"{prefix}{seed}-{index:05d}", "behaviours": behaviours[::-1], "next_query": query}


TRAIN_SEED_OFFSET, EVAL_SEED_OFFSET = 0, 1_000_003  # disjoint generator streams: no shared session


def split(seed: int, *, train: int, eval: int) -> tuple[list[dict], list[dict]]:
    """A train and an eval set from the same data seed, drawn from separate streams."""
    return (list(generate(seed + TRAIN_SEED_OFFSET, train, prefix="train")),
            list(generate(seed + EVAL_SEED_OFFSET, eval, prefix="eval")))


def write_jsonl(sessions, path: Path) -> Path:
    """One session a line, UTF-8 (Chinese as it is, not escaped); written whole or not at all."""
    from exporter.records import write_text_atomic

    write_text_atomic(Path(path), "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in sessions))
    return Path(path)
