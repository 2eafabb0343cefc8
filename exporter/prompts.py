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


# Calibration for activation smoothing (exporter/smoothing.py): behaviour-like text that
# shares no line with the prompts, the held-out text or the tokenizer corpus above, so the
# parity figures are not measured on what calibration saw.
CALIBRATION_TEXTS = (
    "用户最近行为：搜索 扫地机器人；点击 石头 自清洁 扫拖一体；加入购物车 滤网 配件。下一个搜索：拖把头 替换装",
    "用户最近行为：购买 农夫山泉 550ml*24瓶；搜索 苏打水 无糖；点击 元气森林 气泡水 白桃味。下一个搜索：",
    "用户最近行为：浏览 羽绒服 女 长款；收藏 波司登 鹅绒 连帽；搜索 雪地靴 加绒 🧣。下一个搜索：围巾 羊绒",
    "Recent behaviour: searched wireless mouse; clicked Logitech MX Master 3S; added a mouse pad to cart. "
    "Next search:",
    "用户最近行为：搜索 猫粮 成猫 10kg；点击 皇家 室内猫粮；购买 猫砂 豆腐砂 6L 🐱。下一个搜索：逗猫棒",
    "用户最近行为：点击 戴森 吹风机 HD15；搜索 卷发棒 自动；加购 护发精油 100ml。下一个搜索：",
    "Recent behaviour: purchased yoga mat 6mm; searched resistance bands set; clicked foam roller 🧘. "
    "Next search: dumbbells",
    "用户最近行为：搜索 婴儿 纸尿裤 L码；点击 花王 妙而舒；购买 湿巾 80抽*10包。下一个搜索：奶瓶 宽口径",
    "The shopper compared two electric toothbrushes, read the reviews on battery life, and bought "
    "the cheaper one with three spare heads. 随后她搜索了冲牙器和牙线，收藏了一款便携式的。",
    "用户最近行为：搜索 机械键盘 青轴；点击 罗技 G610；浏览 电竞耳机 7.1声道 🎧。下一个搜索：鼠标垫 超大",
    "价格 ¥89.90 → ¥59.90，满200减30，次日达；库存 12 件 ⏰ 距结束 02:15:33",
)
