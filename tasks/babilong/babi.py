"""tasks/babilong/babi.py: bAbI's world and its first two tasks, generated from a seed.

bAbI (Weston et al. 2015, "Towards AI-Complete Question Answering: A Set of Prerequisite Toy Tasks", arXiv
1502.05698) tells short stories in a small world of four persons, six locations and three objects, and asks a
question whose answer the story implies. BABILong hides those stories in long background text. The two tasks here:

    qa1  single supporting fact   persons move between locations.       "Where is Mary?"        her last location
    qa2  two supporting facts     persons also pick up and drop objects. "Where is the milk?"   where its holder is
                                                                                                now, or where it was
                                                                                                dropped

    story = make_story("qa2", random.Random(0))
    story.facts       ("Sandra went to the garden.", "Sandra got the milk there.", "Sandra moved to the office.")
    story.question    "Where is the milk?"
    story.target      "office"
    story.supporting  (1, 2): the indices of the facts the answer rests on

The stories are written here from the tasks' definitions (not read from bAbI's files): a story is a random walk of
the world's state, told one event per sentence, and the question asks about something the told events determine.
"""
from dataclasses import dataclass

PERSONS = ("Mary", "John", "Daniel", "Sandra")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
MOVES = ("moved to", "went to", "went back to", "journeyed to", "travelled to")
TAKES = ("picked up", "got", "grabbed", "took")  # "... the milk there."
DROPS = ("dropped", "discarded", "put down", "left")  # "... the milk."

TASKS = ("qa1", "qa2")
LABELS = {"qa1": LOCATIONS, "qa2": LOCATIONS}  # the answers a task can have, as BABILong's scorer lists them
FACTS = {"qa1": (2, 10), "qa2": (2, 20)}  # default (fewest, most) facts of a story, as in bAbI's stories
WORLD_WORDS = frozenset(w.lower() for w in PERSONS + LOCATIONS + OBJECTS)  # kept out of the background text


@dataclass(frozen=True)
class Story:
    facts: tuple  # sentences, in the order they happen
    question: str
    target: str  # the answer, one of LABELS[task]
    supporting: tuple  # indices into facts of the sentences the answer follows from


def move(person, location, rng):
    return f"{person} {rng.choice(MOVES)} the {location}."


def qa1_story(rng, n_facts):
    """n_facts moves of random persons, each to a location other than the one they are in; asked about one of
    the persons who moved. One supporting fact: the person's last move."""
    where, last_move, facts = {}, {}, []
    for i in range(n_facts):
        person = rng.choice(PERSONS)
        where[person] = rng.choice([place for place in LOCATIONS if place != where.get(person)])
        last_move[person] = i
        facts.append(move(person, where[person], rng))
    person = rng.choice(sorted(where))
    return Story(tuple(facts), f"Where is {person}?", where[person], (last_move[person],))


def qa2_story(rng, n_facts):
    """n_facts events: a person moves; a person whose location is known picks up an object that nobody holds and
    that lies where they are (or was never placed); a person drops an object they hold where they are. Asked about
    an object whose location the events determine: its holder's last location (supporting facts: the pick-up and
    the holder's last move), or where it was dropped (the drop and the move before it). A story that determines no
    object's location is drawn again."""
    while True:
        story = _qa2_attempt(rng, n_facts)
        if story is not None:
            return story


def _qa2_attempt(rng, n_facts):
    where, last_move = {}, {}  # person -> location, index of the last move
    holder, lies = {}, {}  # object -> (person, index of the pick-up); object -> (location, supporting indices)
    facts = []
    for i in range(n_facts):
        takes = [(p, o) for p in where for o in OBJECTS if o not in holder and lies.get(o, (where[p],))[0] == where[p]]
        drops = [(p, o) for o, (p, _) in holder.items()]
        kind = rng.choice(["move", "move"] + ["take"] * bool(takes) + ["drop"] * bool(drops))
        if kind == "move":
            person = rng.choice(PERSONS)
            where[person] = rng.choice([place for place in LOCATIONS if place != where.get(person)])
            last_move[person] = i
            facts.append(move(person, where[person], rng))
        elif kind == "take":
            person, thing = rng.choice(sorted(takes))
            holder[thing] = (person, i)
            lies.pop(thing, None)
            facts.append(f"{person} {rng.choice(TAKES)} the {thing} there.")
        else:
            person, thing = rng.choice(sorted(drops))
            del holder[thing]
            lies[thing] = (where[person], (last_move[person], i))
            facts.append(f"{person} {rng.choice(DROPS)} the {thing}.")
    known = sorted(set(lies) | set(holder))  # a holder always has a known location: pick-ups need one
    if not known:
        return None
    thing = rng.choice(known)
    if thing in holder:
        person, taken = holder[thing]
        target, supporting = where[person], tuple(sorted((taken, last_move[person])))
    else:
        target, supporting = lies[thing]
    return Story(tuple(facts), f"Where is the {thing}?", target, supporting)


STORIES = {"qa1": qa1_story, "qa2": qa2_story}


def make_story(task, rng, facts=None):
    """A random story of task (qa1 or qa2) with a number of facts uniform in facts = (fewest, most), by default
    FACTS[task] (qa1 needs at least 1, qa2 at least 2: dataset.check_facts). rng: a random.Random."""
    fewest, most = facts or FACTS[task]
    return STORIES[task](rng, rng.randint(fewest, most))


def fact_sentences(task):
    """Every sentence a fact of task can be (for a bound on their token counts)."""
    sentences = [f"{p} {verb} the {place}." for p in PERSONS for verb in MOVES for place in LOCATIONS]
    if task == "qa2":
        sentences += [f"{p} {verb} the {o} there." for p in PERSONS for verb in TAKES for o in OBJECTS]
        sentences += [f"{p} {verb} the {o}." for p in PERSONS for verb in DROPS for o in OBJECTS]
    return sentences

