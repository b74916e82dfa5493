"""Prompt lists that ship with b2trl."""

# A few prompts in the form of the paper's first prompt set, "a(n) <animal> <activity>": what the example
# script trains a real model on without --prompts, and what the cost benchmark samples.
ANIMAL_ACTIVITY_PROMPTS = (
    "a cat riding a bike",
    "a dog playing chess",
    "a horse washing the dishes",
    "a monkey doing homework",
    "a rabbit playing the piano",
    "an owl reading a book",
)
