"""A fixed, hand-written training corpus for the test tokenizers (English, Chinese, emoji, code)."""
# ruff: noqa: RUF001

from __future__ import annotations

ENGLISH = """\
The quick brown fox jumps over the lazy dog. A large language model reads tokens and
writes tokens, one at a time, until it emits an end of text marker or runs out of budget.
Serving many users at once means batching their requests together on the same device.
The router looks at which worker already holds the prefix of a prompt in its cache, and
sends the request there so the prefill is short. When a worker is busy, the router weighs
the cost of a cache miss against the cost of waiting in a long queue.
Hello, world! How are you today? I am fine, thank you. What is the weather like in Paris?
It is sunny and warm, with a light breeze from the west. Tomorrow it may rain.
Please write a short poem about the sea. The sea is wide, the sea is deep, it sings the
sailors all to sleep. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 -7 1e9.
Questions and answers: Who wrote this? Nobody knows. Where is the key? Under the mat.
The system prompt tells the assistant to be helpful, honest and brief in every reply.
Streaming responses arrive as small deltas; the client joins them into the full text.
"""

CHINESE = """\
你好，世界！今天天气很好，我们去公园散步吧。
大型语言模型一次生成一个词元，直到遇到结束标记。
请用中文回答下面的问题：北京是中国的首都吗？是的，北京是中国的首都。
我喜欢学习编程，特别是用 Python 写小工具。
服务器同时处理很多用户的请求，路由器会选择缓存命中率最高的工作节点。
春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。
床前明月光，疑是地上霜。举头望明月，低头思故乡。
谢谢你的帮助！不客气，有问题随时问我。
"""

EMOJI = """\
Great job! 🎉🎉 Let's celebrate 🥳 with cake 🍰 and coffee ☕.
I love it ❤️ 👍 😀 😂 🤖 🚀 🌍 🔥 ✨ 🙏 👨‍👩‍👧‍👦 🇯🇵 🇫🇷
Weather today: ☀️ then 🌧️ later, maybe ⛈️ at night 🌙.
"""

CODE = """\
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


class Point:
    def __init__(self, x: float, y: float) -> None:
        self.x = x
        self.y = y

    def __repr__(self) -> str:
        return f"Point({self.x}, {self.y})"


for i in range(10):
    print(i, fibonacci(i))

import json
data = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
print(json.dumps(data, indent=2))

fn main() {
    let v: Vec<i32> = (1..=5).collect();
    println!("{:?}", v);
}

SELECT id, name FROM users WHERE age > 30 ORDER BY name;
"""

CHAT = """\
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
What is 2 + 2?<|im_end|>
<|im_start|>assistant
<think>
The user asks a simple sum. 2 + 2 = 4.
</think>
The answer is 4.<|im_end|>
<|im_start|>user
What is the weather in Paris?<|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call><|im_end|>
<|im_start|>tool
<tool_response>
{"temperature": 21, "condition": "sunny"}
</tool_response><|im_end|>
[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Berlin"}}]
"""

CORPUS: tuple[str, ...] = (ENGLISH, CHINESE, EMOJI, CODE, CHAT)


def corpus_lines() -> list[str]:
    """Every non-empty line of the corpus, in a fixed order."""
    return [line for part in CORPUS for line in part.splitlines() if line.strip()]
