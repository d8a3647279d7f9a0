"""The word lists and facts the synthetic tasks of `gradsift.synthetic` are generated from.

Order matters: the generators walk these lists and dicts in order and the splits and shuffles are seeded, so
reordering them changes which rows `generate` returns and in what order.
"""

from __future__ import annotations

SUBJECTS = [
    "The soup", "The service", "The hotel room", "The film", "The battery", "The delivery", "The concert",
    "The new phone", "The pasta", "The staff", "The museum tour", "The laptop", "The bus ride", "The book",
    "The coffee", "The game", "The camera", "The hike", "The app", "The seminar",
]  # fmt: skip
POSITIVE = [
    "was delightful", "exceeded my expectations", "worked perfectly", "was a real pleasure", "made my day",
    "was worth every penny", "felt warm and welcoming", "was fast and reliable", "was beautifully done",
    "left me smiling",
]  # fmt: skip
NEGATIVE = [
    "was cold and bland", "broke after a day", "was a waste of money", "left me disappointed", "was painfully slow",
    "felt rude and careless", "stopped working twice", "was badly organised", "was far too noisy",
    "made me angry",
]  # fmt: skip
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Peru": "Lima", "Chile": "Santiago",
    "Colombia": "Bogota", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "South Korea": "Seoul", "Iran": "Tehran", "Iraq": "Baghdad", "Morocco": "Rabat", "Ghana": "Accra",
    "Ethiopia": "Addis Ababa", "Cuba": "Havana", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Czechia": "Prague", "Romania": "Bucharest", "Ukraine": "Kyiv",
    "New Zealand": "Wellington", "Philippines": "Manila", "Pakistan": "Islamabad", "Iceland": "Reykjavik",
}  # fmt: skip
UNITS = [  # (from, to, factor, fact)
    ("kilometres", "metres", 1000, "There are 1000 metres in a kilometre"),
    ("metres", "centimetres", 100, "There are 100 centimetres in a metre"),
    ("kilograms", "grams", 1000, "There are 1000 grams in a kilogram"),
    ("hours", "minutes", 60, "There are 60 minutes in an hour"),
    ("minutes", "seconds", 60, "There are 60 seconds in a minute"),
    ("litres", "millilitres", 1000, "There are 1000 millilitres in a litre"),
    ("days", "hours", 24, "There are 24 hours in a day"),
    ("weeks", "days", 7, "There are 7 days in a week"),
]


# (goal, key word the answer must mention, six steps in order)
HOWTO = [
    ("bake a loaf of bread", "bread", [
        "Mix flour, water, yeast and salt into a rough dough",
        "Knead the dough for about ten minutes until it is smooth",
        "Let it rise in a covered bowl until it doubles in size",
        "Shape the dough into a loaf and place it in a tin",
        "Bake it at 220 °C for about 30 minutes",
        "Let the bread cool on a rack before slicing it",
    ]),
    ("make a cup of tea", "tea", [
        "Boil fresh water in a kettle",
        "Warm the cup or teapot with a splash of hot water",
        "Put a tea bag or a spoon of loose leaves in the cup",
        "Pour the hot water over the tea",
        "Let it steep for three to five minutes",
        "Remove the tea and add milk, honey or lemon to taste",
    ]),
    ("cook rice on the stove", "rice", [
        "Rinse the rice in cold water until the water runs clear",
        "Put one part rice and two parts water in a pot",
        "Bring the water to a boil over high heat",
        "Turn the heat to low and cover the pot",
        "Simmer for about 18 minutes without lifting the lid",
        "Take it off the heat, rest it for 5 minutes and fluff it with a fork",
    ]),
    ("make pancakes", "pancakes", [
        "Whisk flour, sugar, baking powder and a pinch of salt",
        "Beat in milk, an egg and a little melted butter",
        "Heat a lightly oiled pan over medium heat",
        "Pour a small ladle of batter into the pan",
        "Flip the pancake when bubbles form on the surface",
        "Cook the other side until golden and serve warm",
    ]),
    ("plant tomatoes in a garden", "tomatoes", [
        "Choose a spot that gets at least six hours of sun",
        "Loosen the soil and mix in compost",
        "Dig holes about 60 cm apart",
        "Plant the seedlings deep, up to their first leaves",
        "Water them well at the base",
        "Add stakes or cages to support the plants as they grow",
    ]),
    ("change a flat bicycle tyre", "tyre", [
        "Release the brake and remove the wheel from the frame",
        "Let out any remaining air and lever the tyre off the rim",
        "Pull out the old inner tube",
        "Check the inside of the tyre for thorns or glass",
        "Fit a new tube and work the tyre back onto the rim",
        "Inflate it to the pressure printed on the tyre and refit the wheel",
    ]),
    ("clean a cast-iron pan", "pan", [
        "Let the pan cool until it is warm, not hot",
        "Rinse it with hot water and scrub with a brush",
        "Use coarse salt as a scrub for stuck-on food",
        "Avoid soaking it or putting it in the dishwasher",
        "Dry it completely on a low burner",
        "Rub a thin layer of oil over the surface before storing it",
    ]),
    ("write a cover letter", "letter", [
        "Read the job description and note the key skills",
        "Address the letter to a named person if you can",
        "Open with the role you are applying for and why it interests you",
        "Give two or three examples that match the key skills",
        "Close by thanking the reader and asking for an interview",
        "Proofread it and keep it to one page",
    ]),
    ("prepare for a job interview", "interview", [
        "Research the company, its products and its values",
        "Reread the job description and your own application",
        "Prepare short stories that show your main skills",
        "Practise answers to common questions out loud",
        "Prepare two or three questions to ask the interviewer",
        "Plan your route and arrive ten minutes early",
    ]),
    ("start running as a beginner", "running", [
        "Get a pair of comfortable running shoes",
        "Start with walk-run intervals of one minute each",
        "Run three times a week with a rest day in between",
        "Add a few minutes of running each week",
        "Warm up before and stretch gently after each run",
        "Keep a pace at which you can still talk",
    ]),
    ("save money on groceries", "groceries", [
        "Plan your meals for the week before you shop",
        "Write a shopping list and stick to it",
        "Compare unit prices on the shelf labels",
        "Buy store brands for basic items",
        "Cook larger batches and freeze the leftovers",
        "Avoid shopping when you are hungry",
    ]),
    ("set up a new email account", "email", [
        "Choose an email provider",
        "Open its sign-up page and click create account",
        "Enter your name and pick an address",
        "Choose a strong, unique password",
        "Add a recovery phone number or address",
        "Turn on two-step verification in the security settings",
    ]),
    ("learn a new language", "language", [
        "Set a clear goal, such as holding a basic conversation",
        "Learn the 500 most common words first",
        "Practise for 20 minutes every day",
        "Listen to podcasts or music in the language",
        "Find a conversation partner or tutor",
        "Write a short diary entry in the language each week",
    ]),
    ("wash a wool sweater", "sweater", [
        "Check the care label for instructions",
        "Fill a basin with cool water and a little wool detergent",
        "Submerge the sweater and press it gently without rubbing",
        "Rinse it in clean cool water",
        "Roll it in a towel to squeeze out the water",
        "Lay it flat to dry away from direct heat",
    ]),
    ("paint a room", "room", [
        "Move the furniture and cover the floor with drop cloths",
        "Fill holes and sand the walls smooth",
        "Tape the edges of the ceiling, windows and trim",
        "Apply a coat of primer",
        "Paint the edges with a brush, then the walls with a roller",
        "Let it dry and apply a second coat",
    ]),
    ("make a budget", "budget", [
        "Add up your monthly income after tax",
        "List your fixed costs such as rent and bills",
        "Track your spending for a month",
        "Group the spending into categories",
        "Set a limit for each category and a savings target",
        "Review the budget at the end of each month",
    ]),
    ("care for a houseplant", "houseplant", [
        "Place it where it gets the right amount of light for its kind",
        "Water it when the top of the soil feels dry",
        "Make sure the pot has drainage holes",
        "Wipe dust off the leaves now and then",
        "Feed it with diluted fertiliser in spring and summer",
        "Repot it when the roots fill the pot",
    ]),
    ("back up the photos on a phone", "photos", [
        "Connect the phone to Wi-Fi and a charger",
        "Open the photo app's settings",
        "Turn on cloud backup for photos",
        "Check that there is enough cloud storage",
        "Also copy the photos to a computer or an external drive",
        "Check that the backup finished before deleting anything",
    ]),
    ("make a simple salad", "salad", [
        "Wash and dry the lettuce",
        "Chop tomatoes, cucumber and a little onion",
        "Put the vegetables in a large bowl",
        "Whisk olive oil, vinegar, salt and pepper for the dressing",
        "Pour the dressing over just before serving",
        "Toss the salad gently and serve",
    ]),
    ("build a campfire safely", "campfire", [
        "Use an existing fire ring where fires are allowed",
        "Clear leaves and twigs from around the ring",
        "Put small dry tinder in the middle",
        "Lean kindling over the tinder like a tent",
        "Light the tinder and add larger wood slowly",
        "Drown the fire with water and stir the ashes before leaving",
    ]),
    ("get better sleep", "sleep", [
        "Go to bed and wake up at the same time every day",
        "Keep the bedroom dark, quiet and cool",
        "Avoid caffeine in the afternoon",
        "Put screens away an hour before bed",
        "Get some daylight and exercise during the day",
        "Keep a short wind-down routine such as reading",
    ]),
    ("organise a small closet", "closet", [
        "Take everything out of the closet",
        "Sort the items into keep, donate and throw away",
        "Group the items you keep by type",
        "Use hangers of one kind to save space",
        "Put the things you use most at eye level",
        "Add boxes or baskets for small items",
    ]),
    ("make a paper airplane", "airplane", [
        "Fold a sheet of paper in half lengthwise and unfold it",
        "Fold the top corners to the centre crease",
        "Fold the new slanted edges to the centre again",
        "Fold the plane in half along the centre crease",
        "Fold each side down to form the wings",
        "Hold it under the wings and throw it gently forward",
    ]),
    ("brew coffee with a French press", "coffee", [
        "Heat water to just below boiling",
        "Grind the coffee beans coarsely",
        "Put two tablespoons of coffee per cup in the press",
        "Pour in the water and stir once",
        "Put the lid on and wait four minutes",
        "Press the plunger down slowly and pour",
    ]),
    ("study for an exam", "exam", [
        "Find out what the exam covers",
        "Make a study schedule for the weeks before it",
        "Summarise each topic in your own words",
        "Test yourself with past papers or flashcards",
        "Take short breaks every 45 minutes",
        "Sleep well the night before the exam",
    ]),
    ("train a puppy to sit", "puppy", [
        "Hold a small treat close to the puppy's nose",
        "Move your hand up so its head follows the treat",
        "Its bottom will lower as its head goes up",
        "Say sit as soon as it sits",
        "Give the treat and praise it at once",
        "Repeat in short sessions a few times a day",
    ]),
    ("clean a laptop keyboard", "keyboard", [
        "Shut the laptop down and unplug it",
        "Turn it upside down and tap out loose crumbs",
        "Blow between the keys with compressed air",
        "Wipe the keys with a cloth slightly dampened with alcohol",
        "Clean around the edges with a cotton swab",
        "Let it dry fully before switching it on",
    ]),
    ("make a smoothie", "smoothie", [
        "Put a cup of milk or juice in the blender",
        "Add a banana and a handful of frozen berries",
        "Add a spoon of yoghurt or oats for thickness",
        "Blend on high until smooth",
        "Add more liquid if it is too thick",
        "Pour it into a glass and drink it fresh",
    ]),
    ("give a good presentation", "presentation", [
        "Know your audience and your main message",
        "Structure the talk with a beginning, middle and end",
        "Keep slides simple with few words",
        "Rehearse out loud several times",
        "Speak slowly and make eye contact",
        "Leave time for questions at the end",
    ]),
    ("fix a leaking tap", "tap", [
        "Turn off the water supply under the sink",
        "Plug the drain so small parts cannot fall in",
        "Remove the handle and unscrew the valve",
        "Replace the worn washer or cartridge",
        "Reassemble the tap in reverse order",
        "Turn the water back on and check for drips",
    ]),
    ("make homemade soup", "soup", [
        "Chop an onion, carrots and celery",
        "Soften them in a pot with a little oil",
        "Add stock and any other vegetables you like",
        "Bring it to a boil, then simmer for 25 minutes",
        "Season with salt, pepper and herbs",
        "Blend it smooth or serve it chunky",
    ]),
    ("plan a road trip", "trip", [
        "Choose the destination and the number of days",
        "Map the route and the stops along the way",
        "Book places to stay in advance",
        "Have the car checked before you leave",
        "Pack snacks, water, a charger and a first-aid kit",
        "Share the plan with a friend or relative",
    ]),
    ("keep a journal", "journal", [
        "Pick a notebook or an app you like",
        "Choose a regular time, such as before bed",
        "Start with a few lines about your day",
        "Write honestly and do not worry about style",
        "Use prompts when you cannot think of anything",
        "Read back old entries now and then",
    ]),
    ("descale a kettle", "kettle", [
        "Fill the kettle halfway with equal parts water and white vinegar",
        "Bring it to the boil and switch it off",
        "Leave it to stand for an hour",
        "Pour the mixture away",
        "Scrub any remaining scale with a soft brush",
        "Boil clean water twice and pour it away before use",
    ]),
    ("make a birthday card", "card", [
        "Fold a sheet of card in half",
        "Sketch a design on the front in pencil",
        "Colour it with pens, paint or pencils",
        "Add stickers, ribbon or glitter if you like",
        "Write a personal message inside",
        "Sign it and put it in an envelope",
    ]),
    ("stretch after a workout", "stretch", [
        "Walk slowly for a few minutes to cool down",
        "Stretch your calves against a wall",
        "Pull each heel towards you to stretch the thighs",
        "Reach for your toes to stretch the hamstrings",
        "Stretch your chest and shoulders with your arms behind you",
        "Hold each stretch for 20 to 30 seconds and breathe slowly",
    ]),
    ("grow herbs on a windowsill", "herbs", [
        "Pick easy herbs such as basil, parsley or mint",
        "Use pots with drainage holes and good compost",
        "Place them on a sunny windowsill",
        "Water when the top of the soil is dry",
        "Pinch off the tips to keep them bushy",
        "Harvest a few leaves at a time",
    ]),
    ("make scrambled eggs", "eggs", [
        "Crack two or three eggs into a bowl",
        "Add a pinch of salt and beat them well",
        "Melt a little butter in a pan over low heat",
        "Pour in the eggs and stir slowly",
        "Take them off the heat while still slightly wet",
        "Serve at once with toast",
    ]),
]  # fmt: skip

# (plural, singular, at least ten members)
LISTS = [
    ("fruits", "fruit", [
        "Apple", "Banana", "Orange", "Mango", "Pear", "Grape", "Strawberry", "Pineapple", "Cherry", "Peach",
        "Kiwi", "Plum",
    ]),
    ("vegetables", "vegetable", [
        "Carrot", "Broccoli", "Spinach", "Potato", "Onion", "Cabbage", "Pepper", "Cucumber", "Lettuce", "Pea",
        "Celery", "Cauliflower",
    ]),
    ("farm animals", "farm animal", [
        "Cow", "Pig", "Sheep", "Goat", "Chicken", "Horse", "Duck", "Donkey", "Turkey", "Rabbit", "Goose", "Llama",
    ]),
    ("wild animals", "wild animal", [
        "Lion", "Tiger", "Elephant", "Giraffe", "Zebra", "Wolf", "Bear", "Fox", "Deer", "Kangaroo", "Gorilla",
        "Leopard",
    ]),
    ("birds", "bird", [
        "Robin", "Sparrow", "Eagle", "Owl", "Parrot", "Penguin", "Swan", "Pigeon", "Crow", "Flamingo", "Hawk",
        "Heron",
    ]),
    ("musical instruments", "musical instrument", [
        "Piano", "Guitar", "Violin", "Drums", "Flute", "Trumpet", "Cello", "Saxophone", "Clarinet", "Harp",
        "Trombone", "Ukulele",
    ]),
    ("sports", "sport", [
        "Football", "Tennis", "Basketball", "Cricket", "Rugby", "Golf", "Swimming", "Volleyball", "Baseball",
        "Hockey", "Cycling", "Badminton",
    ]),
    ("colours", "colour", [
        "Red", "Blue", "Green", "Yellow", "Orange", "Purple", "Pink", "Brown", "Black", "White", "Grey",
        "Turquoise",
    ]),
    ("programming languages", "programming language", [
        "Python", "Java", "C", "JavaScript", "Rust", "Go", "Ruby", "Kotlin", "Swift", "PHP", "Haskell", "Scala",
    ]),
    ("planets in the solar system", "planet in the solar system", [
        "Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune",
    ]),
    ("countries in Europe", "country in Europe", [
        "France", "Germany", "Italy", "Spain", "Portugal", "Poland", "Sweden", "Norway", "Greece", "Austria",
        "Ireland", "Belgium",
    ]),
    ("countries in Africa", "country in Africa", [
        "Nigeria", "Kenya", "Egypt", "Ghana", "Ethiopia", "Morocco", "Senegal", "Uganda", "Tanzania", "Algeria",
        "Zambia", "Botswana",
    ]),
    ("cities in Asia", "city in Asia", [
        "Tokyo", "Beijing", "Seoul", "Bangkok", "Delhi", "Mumbai", "Jakarta", "Manila", "Hanoi", "Singapore",
        "Shanghai", "Osaka",
    ]),
    ("kitchen utensils", "kitchen utensil", [
        "Spatula", "Whisk", "Ladle", "Tongs", "Peeler", "Grater", "Colander", "Rolling pin", "Knife", "Can opener",
        "Sieve", "Measuring cup",
    ]),
    ("tools in a toolbox", "tool in a toolbox", [
        "Hammer", "Screwdriver", "Wrench", "Pliers", "Tape measure", "Saw", "Spirit level", "Chisel",
        "Utility knife", "Drill", "Allen key", "Clamp",
    ]),
    ("flowers", "flower", [
        "Rose", "Tulip", "Daisy", "Sunflower", "Lily", "Orchid", "Daffodil", "Lavender", "Poppy", "Iris", "Peony",
        "Marigold",
    ]),
    ("trees", "tree", [
        "Oak", "Maple", "Pine", "Birch", "Willow", "Cedar", "Elm", "Beech", "Ash", "Spruce", "Palm", "Chestnut",
    ]),
    ("board games", "board game", [
        "Chess", "Monopoly", "Scrabble", "Checkers", "Backgammon", "Go", "Risk", "Catan", "Cluedo", "Ludo",
        "Othello", "Ticket to Ride",
    ]),
    ("breakfast foods", "breakfast food", [
        "Toast", "Cereal", "Porridge", "Pancakes", "Eggs", "Yoghurt", "Bacon", "Waffles", "Croissant", "Muesli",
        "Bagel", "Fruit salad",
    ]),
    ("ocean animals", "ocean animal", [
        "Whale", "Dolphin", "Shark", "Octopus", "Jellyfish", "Seal", "Turtle", "Starfish", "Squid", "Crab",
        "Lobster", "Seahorse",
    ]),
    ("insects", "insect", [
        "Ant", "Bee", "Butterfly", "Beetle", "Dragonfly", "Grasshopper", "Ladybird", "Mosquito", "Moth", "Wasp",
        "Cricket", "Firefly",
    ]),
    ("types of weather", "type of weather", [
        "Rain", "Snow", "Sunshine", "Fog", "Hail", "Wind", "Thunderstorm", "Drizzle", "Sleet", "Frost", "Clouds",
        "Heatwave",
    ]),
    ("parts of the human body", "part of the human body", [
        "Heart", "Lungs", "Brain", "Liver", "Stomach", "Kidney", "Skin", "Hand", "Foot", "Eye", "Ear", "Knee",
    ]),
    ("school subjects", "school subject", [
        "Mathematics", "English", "History", "Geography", "Biology", "Chemistry", "Physics", "Art", "Music",
        "French", "Computing", "Economics",
    ]),
    ("means of transport", "means of transport", [
        "Car", "Bus", "Train", "Bicycle", "Plane", "Boat", "Tram", "Motorcycle", "Ferry", "Taxi", "Scooter",
        "Helicopter",
    ]),
    ("pieces of furniture", "piece of furniture", [
        "Chair", "Table", "Sofa", "Bed", "Wardrobe", "Desk", "Bookshelf", "Stool", "Dresser", "Armchair", "Bench",
        "Cabinet",
    ]),
    ("herbs and spices", "herb or spice", [
        "Basil", "Oregano", "Thyme", "Rosemary", "Cinnamon", "Cumin", "Paprika", "Ginger", "Turmeric", "Parsley",
        "Mint", "Nutmeg",
    ]),
    ("clothes", "item of clothing", [
        "Shirt", "Trousers", "Jacket", "Dress", "Skirt", "Sweater", "Coat", "Socks", "Scarf", "Hat", "Jeans",
        "Shorts",
    ]),
    ("metals", "metal", [
        "Iron", "Copper", "Gold", "Silver", "Aluminium", "Zinc", "Tin", "Lead", "Nickel", "Titanium", "Platinum",
        "Magnesium",
    ]),
    ("dog breeds", "dog breed", [
        "Labrador", "Poodle", "Beagle", "Bulldog", "Boxer", "Dachshund", "Collie", "Greyhound", "Husky", "Terrier",
        "Spaniel", "Dalmatian",
    ]),
]  # fmt: skip
