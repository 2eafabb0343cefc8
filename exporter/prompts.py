"""Built-in text for verification: behaviour prompts, a held-out text, a tokenizer corpus.

The prompts look like what the app feeds the model: a user's recent searches, clicks,
cart adds and purchases, mostly Chinese product text, ending where the next query goes.
"""

from __future__ import annotations

BEHAVIOUR_PROMPTS = (
    "用户最近行为：搜索 无线蓝牙耳机；点击 华为 FreeBuds Pro 3；加入购物车 耳机保护套。下一个搜索：",
    "用户最近行为：购买 蒙牛 纯牛奶 250ml*24盒；搜索 早餐 燕麦片；点击 桂格 即食燕麦 1kg。下一个搜索：",
    "用户最近行为：搜索 连衣裙 夏季 新款；点击 碎花长裙 🌸；收藏 雪纺 半身裙。下一个搜索：",
    "用户最近行为：加购 三只松鼠 坚果大礼包；搜索 年货 礼盒 🎁；点击 良品铺子 零食。下一个搜索：",
    "Recent behaviour: searched running shoes men 42; clicked Nike Pegasus 41; added socks to cart 👟. Next search:",
    "用户最近行为：搜索 儿童 保温杯；点击 316不锈钢 吸管杯；购买 卡通 水杯套。下一个搜索：",
    "用户最近行为：浏览 美的 电饭煲 4L；搜索 空气炸锅；点击 小熊 多功能 料理锅。下一个搜索：",
    "Recent behaviour: purchased organic green tea 🍵; searched matcha powder; clicked bamboo whisk. Next search:",
    "用户最近行为：搜索 篮球鞋 李宁；点击 韦德之道 10 ❤️；加入购物车 篮球 7号。下一个搜索：",
    "用户最近行为：搜索 手机壳 iPhone 16 Pro；点击 透明 防摔壳；购买 钢化膜 2片装。下一个搜索：",
)

HELDOUT_TEXT = (
    "The customer opened the app in the evening and searched for a light rain jacket. "
    "After comparing three brands she added a packable one to the cart, then looked at "
    "waterproof hiking boots and a small backpack. 她又搜索了登山杖和速干T恤，最后购买了雨衣和背包。"
    " The next morning she returned to check the delivery time and browsed camping lanterns."
)

TOKENIZER_CORPUS = BEHAVIOUR_PROMPTS + (
    HELDOUT_TEXT,
    "华为 Mate 70 Pro+ 手机 12GB+512GB 雅川青 🔥限时优惠🔥",
    "￥199.00 包邮 | 7天无理由退货 | 正品保障 ✅",
    "emoji: 😀😃😄😁 👨‍👩‍👧‍👦 🇨🇳 🏳️‍🌈 ❤️‍🔥",
    "  leading spaces, trailing spaces   ",
    "mixed 中英 text with numbers 12345 and symbols #@$%^&*()_+",
    "日本語のテキスト、한국어 텍스트, Ελληνικά, русский",
    "tabs\tand\nnewlines\n\nend",
)
