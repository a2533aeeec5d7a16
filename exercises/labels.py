"""
Exercise: the label mask of a two-turn conversation (course part 3; train.py format_phi2 and tokenize).

Stage 2 learns only the answers. Write `ids_and_labels`. Check it with:  python -m pytest exercises/ -k labels
"""
import imp  # noqa: F401  (imp.SYSTEM_PROMPT, imp.IGNORE_INDEX, imp.IMAGE_PLACEHOLDER are what you need)


def ids_and_labels(tokenizer, conversations: list) -> tuple:
    """conversations: [{"from": "human", "value": "<image>\\nQ1"}, {"from": "gpt", "value": "A1"},
                       {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]  (LLaVA's format)
    -> (ids, labels), two lists of ints of the same length.

    1. The text, in the official phi2 template (imp.SYSTEM_PROMPT, then one space):
         "{system} USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
       (the <image> tag is at the start of the first question, as in the example).
    2. The supervised character spans: each answer, from the space after "ASSISTANT:" (byte-level BPE glues that
       space to the answer's first word) to the end of its "</s>".
    3. ids = tokenizer.encode(text).ids; a token's label is its own id when its first character (its offset in
       tokenizer.encode(text).offsets) lies inside a span, else imp.IGNORE_INDEX (-100).
    """
    raise NotImplementedError("write ids_and_labels(tokenizer, conversations)")
