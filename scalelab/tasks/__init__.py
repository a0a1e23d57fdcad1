"""
Instruction tasks over the built-in world, FLAN-style: instruction -> short response.

Used for instruction fine-tuning (SFT), reward modelling, PPO and evaluation. Prompts
are short (mostly under 40 words, at most one demonstration) and answers are a number,
a name, yes/no or a short list, because the models are tiny (1-10M parameters, context
128-256 tokens).

    from scalelab.tasks import TASKS, TRAIN_TASKS, HELDOUT_TASKS, make_examples
    ex = TASKS["addition"].make(random.Random(0), difficulty=4)
    ex.prompt, ex.answer            # ('What is 4821 plus 377?', '5198')
    TASKS["addition"].score(ex, " 5198.\\n")   # 1.0
    batch = make_examples(TRAIN_TASKS, 1000, seed=0)

Families (difficulty range in brackets; * = held out, never trained on):

  arithmetic   addition [1-5 digits], subtraction [1-5 digits], multiplication [1-3],
               addition_choice* [1-3 digits, options], addition_words* [1-3]
  numbers      compare_numbers [1-4], next_number [1-4], previous_number [1-4],
               number_to_words [1-5], words_to_number* [1-5]
  number lists sort_ascending [1-4], sort_descending [1-4], list_min [1-4], list_max [1-4]
  word lists   count_items [1-3], reverse_list [1-4], first_item [1-5], last_item [1-5],
               list_format [1-4], copy [1-4], unscramble [1-3]
  people       compare_ages [1: ages given, 2: recalled], older_yesno* [1-2], fact_home,
               fact_age, fact_colour, fact_pet, fact_pet_name, fact_job, fact_yesno*
  stories      story [1-3 steps]

Every family has 3-5 templates: a plain instruction, a question, a corpus-style
completion or Q/A form, an options variant where choices make sense, and a 1-shot
variant. What "held out" means (a trained skill in a format and wording no trained
template shows) and how it is checked: families.py. How scoring is lenient: core.py.
Facts refer to default_world() = World.create(0), the world of the default data seed;
pass world= to make / make_examples for another.
"""

from scalelab.tasks.core import Example, TaskFamily, default_world, normalize
from scalelab.tasks.families import (
    HELDOUT_TASKS,
    TASKS,
    TRAIN_TASKS,
    make_examples,
    unseen_examples,
)

__all__ = ["Example", "TaskFamily", "TASKS", "TRAIN_TASKS", "HELDOUT_TASKS",
           "make_examples", "unseen_examples", "normalize", "default_world"]
