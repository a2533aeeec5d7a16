"""Reference solution: the label mask of a two-turn conversation (exercises/labels.py)."""
import imp


def ids_and_labels(tokenizer, conversations: list) -> tuple:
    text, spans = imp.SYSTEM_PROMPT + " ", []
    for turn in conversations:
        if turn["from"] == "human":
            text += f"USER: {turn['value']} "
        else:
            text += "ASSISTANT:"
            start = len(text)  # the span starts at the space before the answer
            text += f" {turn['value']}</s>"
            spans.append((start, len(text)))
    encoding = tokenizer.encode(text)
    labels = [token if any(start <= offset < end for start, end in spans) else imp.IGNORE_INDEX
              for token, (offset, _) in zip(encoding.ids, encoding.offsets)]
    return encoding.ids, labels
