"""The GRPO demo's reward: the age, and nothing else, on the first line of the answer."""


def first_line_age(completion: str, example: dict) -> float:
    """1 when the completion's first line is exactly the person's age (" 35", not " 35 years")."""
    return float(completion.split("\n")[0].strip() == example["answer"])
