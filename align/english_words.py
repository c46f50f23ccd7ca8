"""Word lists for :mod:`align.english`, by part of speech and by what a word can sensibly combine with.

Nouns are split by kind (people, animals, small and large things, food, places, abstract nouns) so the
grammar can pick verbs and adjectives that fit, which keeps sentences sensible as well as grammatical.
Lists are whitespace-separated lemmas; inflection is done by :mod:`align.english_forms`, with the irregular or
tricky forms listed here. Words whose article or inflection the simple rules would get wrong (``hour``,
``unicorn``, ``mango``, ``quiz``) are left out rather than special-cased.
"""


def _split(text: str) -> list[str]:
    return text.split()


def _pairs(text: str) -> list[tuple[str, ...]]:
    """"a:b c:d" -> [("a", "b"), ("c", "d")]; "_" stands for a space inside a name (New_Zealand)."""
    return [tuple(p.replace("_", " ").split(":")) for p in text.split()]


def _phrases(text: str) -> list[str]:
    """Phrases separated by "|"; line breaks count as spaces."""
    return [phrase.strip() for phrase in text.replace("\n", " ").split("|")]


# --- nouns -------------------------------------------------------------------------------------------

PEOPLE_F = _split("girl woman queen princess lady bride witch ballerina mermaid")
PEOPLE_M = _split("boy man king prince gentleman groom knight wizard fisherman postman policeman fireman")
# Family words take a possessive ("her brother", not "a brother"); parents stay singular (no "my mothers").
PARENTS_F = _split("mother grandmother grandma mom")
PARENTS_M = _split("father grandfather grandpa dad")
SIBLINGS_F = _split("sister aunt daughter niece")
SIBLINGS_M = _split("brother uncle son nephew")
JOBS = _split("""teacher doctor nurse farmer baker pilot driver student dentist chef artist singer dancer
writer painter poet clown soldier sailor captain judge lawyer builder plumber gardener carpenter cashier
waiter scientist engineer vet musician magician detective reporter photographer tailor butcher librarian
mechanic shopkeeper hunter explorer inventor author coach athlete astronaut architect actor ranger miner
barber florist banker grocer""")
PEOPLE_N = JOBS + _split("""child baby kid friend neighbor stranger visitor guest tourist passenger customer
swimmer runner climber toddler teenager parent cousin twin classmate teammate boss manager officer hero giant
pirate ghost monster elf fairy troll""")
# Family and friends: the people a subject gives things to ("Anna gave her brother a ball").
FAMILY = PARENTS_F + PARENTS_M + SIBLINGS_F + SIBLINGS_M + _split("cousin friend neighbor teacher classmate")

ANIMALS = _split("""dog cat horse cow pig sheep goat duck chicken hen rooster goose rabbit mouse rat hamster
parrot bird owl eagle hawk crow pigeon swan penguin ostrich flamingo peacock turkey lion tiger bear wolf fox
deer elephant giraffe zebra monkey gorilla kangaroo koala panda camel hippo rhino crocodile alligator snake
lizard turtle tortoise frog toad fish shark whale dolphin seal crab lobster squirrel hedgehog badger beaver
otter raccoon skunk bat donkey pony lamb calf puppy kitten bee butterfly ant spider ladybug beetle snail worm
caterpillar moth cheetah leopard jaguar panther yak ox llama hyena lemur mole chipmunk seagull robin sparrow
woodpecker dinosaur dragon ferret gerbil walrus vulture weasel mule puffin pelican toucan stork heron falcon
gazelle antelope iguana porcupine armadillo wombat cobra python hornet wasp cricket grasshopper firefly
dragonfly""")
# (animal, the sound it makes): "The dog barked at the postman."
ANIMAL_SOUNDS = _pairs("""dog:bark dog:growl cat:purr cat:meow lion:roar tiger:roar duck:quack cow:moo
bee:buzz snake:hiss wolf:howl bear:growl mouse:squeak owl:hoot horse:neigh pig:oink sheep:bleat donkey:bray
rooster:crow frog:croak bird:chirp sparrow:chirp goose:honk elephant:trumpet monkey:chatter parrot:squawk""")

SMALL_THINGS = _split("""ball box cup bowl plate spoon fork knife bottle jar basket bag backpack book notebook
pencil pen crayon eraser ruler letter card envelope stamp map key lock coin wallet purse ticket gift toy doll
kite balloon puzzle block robot drum guitar violin flute trumpet whistle bell clock watch phone camera radio
lamp candle flashlight umbrella hat cap scarf glove mitten sock shoe boot coat jacket shirt dress skirt
sweater belt button ring necklace bracelet crown mask brush comb mirror towel pillow blanket rope string
ribbon net bucket shovel hammer nail ladder sticker stone rock pebble shell feather leaf flower rose daisy
tulip seed acorn stick branch log brick cage nest vase pot pan kettle teapot mug glass jug tray napkin magnet
marble trophy medal badge flag poster picture photo painting drawing newspaper magazine comic diary calendar
compass telescope microscope laptop computer keyboard zipper quilt xylophone jigsaw axe sponge torch spade
rake broom mop marker paintbrush bead pin needle sandal slipper apron helmet wig lunchbox toothbrush hairbrush
tissue wand sword shield arrow jewel diamond pearl sack parcel package suitcase lid cork straw ladle saucer
globe ornament puppet rattle skateboard scooter sled hook bone bookmark folder cushion rug carpet curtain
frame lantern""")
# Things that are opened and closed: "Please close the door."
OPENABLE = _split("door window gate box book bag jar bottle envelope parcel suitcase lunchbox curtain")
LARGE_THINGS = _split("""car bus truck van train boat ship plane bicycle bike tractor taxi rocket helicopter
house cottage tower bridge wall fence gate door window tree bush statue fountain building barn tent sofa bed
table chair desk shelf cupboard fridge oven stove piano television swing slide snowman scarecrow windmill
lighthouse canoe raft sailboat submarine wagon cart sandcastle hut igloo treehouse kennel bench carriage
ambulance motorcycle""")
# Things one sits, stands or puts things on, for "on"/"under" phrases.
SURFACES = _split("table chair bed sofa desk bench shelf floor rug carpet step roof")
TRAVEL = _split("car bus train plane boat bike bicycle taxi ship ferry")

FOODS = _split("""apple banana orange pear peach plum cherry grape lemon lime melon watermelon strawberry
blueberry pineapple coconut carrot potato tomato onion cucumber pumpkin bean pea nut cookie biscuit cake pie
muffin cupcake pizza sandwich burger sausage egg pancake waffle doughnut candy lollipop cracker pretzel bagel
taco noodle meatball olive avocado apricot radish turnip cabbage vegetable berry peanut walnut almond chestnut
raisin dumpling salad steak fig kiwi papaya bun pickle mushroom tart brownie eggplant""")
FOOD_MASS = _split("""bread rice soup cheese butter honey jam pasta cereal chocolate sugar salt flour popcorn
yogurt porridge toast spaghetti meat cream corn""")
DRINKS = _split("water milk juice tea coffee lemonade cocoa soda")
CONTAINERS = _split("cup glass bottle jug mug bowl")

PLACES_IN = _split("""park garden kitchen bedroom bathroom classroom library house school shop store market
forest city town village field meadow jungle desert cave castle palace museum garage barn hall room office
bakery restaurant cafe cinema lake river sea ocean pond pool valley yard attic basement cellar kingdom
playground hospital church temple studio gym hotel factory supermarket greenhouse orchard stable tunnel""")
PLACES_AT = _split("""beach zoo station airport farm stadium bank circus fair aquarium seaside port park
market library museum hotel bakery cafe playground""")

TELLABLE = _split("story joke secret poem riddle tale rhyme fact legend fable")
PROBLEMS = _split("problem puzzle riddle mystery question equation")
EVENTS = _split("""party picnic trip game race concert show festival match lesson holiday vacation adventure
meeting parade film movie wedding contest journey breakfast lunch dinner supper snack feast""")
PRIZES = _split("game race match contest competition prize medal trophy award")
IDEAS = _split("""idea plan dream wish thought memory feeling choice habit hobby goal opinion guess rule
promise mistake surprise reason""")
TIMES = _split("day week month year morning afternoon evening night weekend moment")
SEASONS = _split("spring summer autumn winter")
DAYS = _split("Monday Tuesday Wednesday Thursday Friday Saturday Sunday")
MONTHS = _split("January February March April May June July August September October November December")

# Nouns whose plural the rules (+s, +es after s/x/z/ch/sh, consonant+y -> ies) would get wrong.
IRREGULAR_PLURALS = _split("""child:children man:men woman:women mouse:mice goose:geese foot:feet tooth:teeth
sheep:sheep fish:fish deer:deer ox:oxen person:people wolf:wolves leaf:leaves knife:knives wife:wives
loaf:loaves shelf:shelves calf:calves thief:thieves scarf:scarves elf:elves potato:potatoes tomato:tomatoes
hero:heroes gentleman:gentlemen fisherman:fishermen postman:postmen policeman:policemen fireman:firemen
snowman:snowmen""")

# --- names and places --------------------------------------------------------------------------------

NAMES_F = _split("""Anna Emma Olivia Sophia Mia Lily Grace Chloe Zoe Ella Amy Lucy Kate Sarah Emily Hannah
Julia Laura Maria Rosa Nina Eva Alice Clara Ruby Ivy Daisy Hazel Violet Jasmine Layla Aisha Fatima Mei Yuki
Priya Sofia Isabel Leah Nora Stella Luna Ada Iris Jade Holly Molly Poppy Rachel Rebecca Helen Jane Mary Ellen
Susan Linda Karen Diana Paula Tina Vera Wendy Xena Yasmin Zara Quinn Beth Gina Hope Joy Kim Lena Mila Olga Pam
Tara Una""")
NAMES_M = _split("""Tom Sam Ben Jack Max Leo Noah Liam Oliver Lucas Ethan Adam David Daniel James John Peter
Paul Mark Luke Matthew Henry Harry George Oscar Felix Hugo Victor Xavier Yusuf Zack Omar Ali Ravi Kenji Hiro
Carlos Diego Pablo Marco Luca Ivan Igor Erik Hans Pierre Andre Kofi Tariq Finn Owen Ryan Kevin Brian Colin
Dylan Eric Frank Gary Joe Karl Larry Mike Ned Otto Quentin Ray Steve Ted Walter Vince Alex Jim Bob Fred Gus
Ian""")
# (city, country): only true pairs, since "Paris is a city in France." is stated as a fact.
CITIES = _pairs("""Paris:France Lyon:France Marseille:France London:England Manchester:England
Liverpool:England Oxford:England Bristol:England Edinburgh:Scotland Glasgow:Scotland Cardiff:Wales
Dublin:Ireland Rome:Italy Milan:Italy Venice:Italy Naples:Italy Florence:Italy Madrid:Spain Barcelona:Spain
Seville:Spain Lisbon:Portugal Porto:Portugal Berlin:Germany Munich:Germany Hamburg:Germany Vienna:Austria
Zurich:Switzerland Geneva:Switzerland Brussels:Belgium Warsaw:Poland Krakow:Poland Budapest:Hungary
Athens:Greece Oslo:Norway Bergen:Norway Stockholm:Sweden Copenhagen:Denmark Helsinki:Finland Reykjavik:Iceland
Moscow:Russia Cairo:Egypt Nairobi:Kenya Lagos:Nigeria Accra:Ghana Dakar:Senegal Marrakesh:Morocco
Casablanca:Morocco Tunis:Tunisia Tokyo:Japan Osaka:Japan Kyoto:Japan Beijing:China Shanghai:China Delhi:India
Mumbai:India Bangkok:Thailand Hanoi:Vietnam Jakarta:Indonesia Sydney:Australia Melbourne:Australia
Perth:Australia Toronto:Canada Vancouver:Canada Montreal:Canada Chicago:America Boston:America Seattle:America
Denver:America Dallas:America Miami:America Houston:America Lima:Peru Santiago:Chile Bogota:Colombia
Quito:Ecuador Caracas:Venezuela Havana:Cuba Auckland:New_Zealand Wellington:New_Zealand Buenos_Aires:Argentina
Cape_Town:South_Africa Mexico_City:Mexico""")

# --- verbs -------------------------------------------------------------------------------------------

# Irregular past tenses; everything else takes -ed by rule.
IRREGULAR_PAST = _split("""be:was have:had do:did go:went see:saw eat:ate drink:drank run:ran swim:swam
sing:sang sit:sat stand:stood sleep:slept fall:fell hide:hid leave:left wake:woke kneel:knelt fly:flew
ride:rode write:wrote draw:drew speak:spoke think:thought win:won lose:lost take:took bring:brought hold:held
throw:threw catch:caught hit:hit find:found keep:kept buy:bought sell:sold make:made build:built break:broke
get:got lend:lent choose:chose forget:forgot know:knew teach:taught feed:fed meet:met hear:heard
understand:understood tell:told read:read give:gave send:sent cut:cut grow:grew dig:dug shake:shook spin:spun
shine:shone rise:rose set:set blow:blew bite:bit fight:fought steal:stole hang:hung beat:beat forgive:forgave
put:put begin:began say:said pay:paid feel:felt come:came sweep:swept sting:stung swing:swung light:lit
shut:shut sew:sewed lay:laid sink:sank slide:slid""")
# Verbs that double their last consonant before -ed and -ing (stop -> stopped, run -> running).
DOUBLING = _split("""stop drop hop shop chop clap nap tap wrap grab rub hug beg jog nod plan trip skip slip
drip rob knit pat chat hum stir spin run swim sit get put cut hit let set shut win dig begin forget admit
prefer grin shrug swap scrub pet""")

INTRANSITIVE = _split("""sleep run walk jump swim laugh smile cry sing dance play sit stand wait rest work
shout whisper climb fall hide listen arrive leave return stay wake yawn sneeze cough shiver hop crawl kneel
wave nod blink dream relax hurry rush wander whistle giggle grin frown sigh scream snore skip jog stretch clap
cheer pray read write draw paint cook bake sew study practice think speak talk chat shop paddle skate ski surf
sail row float camp fish shrug wink gasp pause breathe eat agree argue apologize complain disappear appear
learn knit hum""")
ANIMAL_INTRANSITIVE = _split("""sleep run walk jump swim play sit rest hide climb crawl hop eat drink wait
wander dig splash sniff stretch yawn scratch hunt shiver sneeze blink dream escape fight""")
# Verbs whose subject is a thing: "The red ball rolled under the bed."
THING_INTRANSITIVE = _split("""fall roll break float sink bounce slide shake spin disappear move appear wobble
rattle crack glow sparkle drop""")
# (subject, verb) for nature: "The wind blew all night."
NATURE = _pairs("""sun:shine sun:rise sun:set moon:rise moon:shine moon:glow wind:blow wind:howl wind:whistle
rain:fall rain:stop snow:fall snow:melt storm:pass storm:end river:flow""")

# Transitive verbs, by the kind of object they take.
T_THINGS = _split("""take bring carry hold drop throw catch kick hit find lose keep hide buy sell want need
like love have get make build break fix mend clean wash paint draw push pull lift move touch use borrow lend
share choose pick check count collect wrap pack fold see notice remember forget polish order deliver grab
steal shake fill decorate weigh measure examine admire swap trade hang search sort bury roll toss scrub sweep
""")
T_LARGE = _split("""see find like love want need buy sell paint draw clean wash fix build push pull watch
notice remember forget admire move rent check repair decorate photograph""")
T_FOOD = _split("""eat cook buy sell want like love hate share taste smell bake grow wash cut order serve
prefer finish need find drop hide count pick chop peel""")
T_DRINK = _split("drink pour spill want like love hate buy share taste smell order finish heat need")
T_PEOPLE = _split("""meet help call visit thank hug kiss teach ask answer invite greet pay trust protect save
rescue believe surprise tease scold praise bother blame forgive annoy obey recognize interrupt warn phone hire
introduce interview support cheer join miss like love hate know remember forget see watch follow wake tickle
photograph draw paint""")
T_ANIMALS = _split("""feed pet adopt brush walk train chase catch photograph draw tickle cuddle stroke
wash rescue name follow find watch see like love""")
# Verbs an animal can do to another animal or a person: "The cat chased the mouse."
ANIMAL_T = _split("chase see follow watch bite smell find catch lick push scare hear")
ANIMAL_T_THINGS = _split("chase find smell lick push bite catch carry drop hide")
T_TELLABLE = _split("""hear remember forget share like love enjoy write read learn know repeat finish tell
invent imagine believe explain understand practice recite""")
T_PROBLEMS = _split("solve explain understand discuss study answer find fix ignore")
T_EVENTS = _split("""enjoy plan miss like love remember forget join watch attend organize prepare describe
imagine hate start finish leave host""")
T_PRIZES = _split("win lose")
T_IDEAS = _split("have share explain like love remember forget discuss change describe follow")
T_PLACES = _split("""visit leave reach enter clean paint explore love like hate find search decorate describe
photograph remember miss build draw guard""")
T_PLACE_NAMES = _split("visit leave reach explore love like hate remember miss describe photograph")
# verb:preposition:object kinds (t = small things, f = food, s = stories), for "gave her brother a
# ball" and "gave a ball to her brother".
DITRANSITIVE = _pairs("""give:to:tf send:to:ts show:to:ts bring:to:tf hand:to:tf lend:to:t sell:to:tf
throw:to:tf pass:to:tf offer:to:tf buy:for:tf make:for:f bake:for:f cook:for:f find:for:t get:for:tf tell:to:s
read:to:s write:to:s""")
# Verbs that describe a state, not an action: never in the progressive ("is knowing" is not English).
STATIVE = _split("""have know like love hate want need believe understand remember forget prefer recognize see
hear""")
# Verbs after "likes"/"loves": "Tom likes swimming."
HOBBIES = _split("""swim dance sing paint draw read write cook bake skate ski surf sail fish camp knit sew
climb run jog shop play study""")

# --- adjectives, adverbs -----------------------------------------------------------------------------

COLORS = _split("red blue green yellow orange purple pink brown black white gray gold silver")
A_LIVING = _split("""happy sad angry tired hungry thirsty sleepy brave shy kind friendly clever smart silly
funny lazy busy calm quiet noisy proud curious gentle polite rude grumpy cheerful excited nervous worried
scared young old little big small tall short strong weak fast slow wise lucky lonely famous helpful careful
clumsy cute pretty beautiful lovely healthy lively playful naughty bossy cheeky greedy jealous generous
patient fearless bold nice sweet jolly merry good bad quick confident daring eager energetic fussy gloomy
grateful hopeful humble joyful jumpy loyal mighty modest moody nimble restless serious sneaky sporty stubborn
thankful thoughtful timid tough careless chatty bored dizzy grouchy zany brainy chubby muddy sly elegant
adorable active alert anxious awkward innocent caring charming determined foolish gifted hardworking
imaginative peaceful scruffy selfish sincere smelly spoiled sulky talented tidy upset wicked witty weary""")
A_PEOPLE = _split("rich poor handsome busy polite grumpy sensible")
A_ANIMALS = _split("""furry fluffy spotted striped tame wild fierce hairy fat thin skinny shaggy frisky sleek
scaly spiky feathery slimy speckled huge tiny""")
# Adjectives used after "is"/"was" only ("an afraid dog" is not English).
A_PREDICATIVE = _split("afraid asleep awake alone glad ready sorry")
A_THINGS = _split("""big small little large tiny huge long short heavy light new old round square flat sharp
soft hard smooth rough shiny dull bright dark clean dirty wet dry hot cold warm cool full empty broken wooden
plastic golden cheap expensive precious beautiful pretty ugly strange special simple plain fancy tidy messy
neat sticky fuzzy dusty rusty sparkling striped spotted colorful enormous ancient magic wonderful lovely nice
narrow wide thick thin bumpy cracked curved damp delicate dented dim fluffy fragile glossy hollow icy lumpy
metal modern muddy oval pointed shabby silky slippery solid spare spotless stiff sturdy tangled tight torn
wrinkled handmade homemade valuable rare common ordinary unusual odd perfect gigantic noisy smelly lucky
mysterious funny silly comfortable cozy itchy loose crooked bent""")
A_FOOD = _split("""fresh ripe sweet sour bitter salty spicy tasty delicious juicy crunchy crispy hot cold warm
big small tiny huge rotten stale frozen sticky creamy chewy buttery cheesy crumbly fried fruity greasy healthy
mild mushy nutty plain raw roasted smoky soggy sugary tender toasted yummy boiled bland""")
A_PLACES = _split("""quiet busy noisy crowded empty dark bright sunny shady huge tiny beautiful lovely old new
clean dirty cold warm peaceful famous ancient modern strange secret hidden magic wide narrow deep wild spooky
cozy pleasant calm chilly colorful cool damp distant dusty enormous gloomy grand green hilly icy lively lonely
messy misty muddy rocky sandy silent small big little snowy spacious tidy windy wonderful charming friendly
magnificent pretty royal safe smelly ugly""")
A_IDEAS = _split("""good bad great simple clever brilliant strange funny silly sad happy long short new old
secret important interesting exciting boring easy hard difficult wonderful terrible crazy lovely sweet true
scary amazing awful brave clear curious dangerous dark famous fantastic fresh helpful lucky mysterious odd
perfect pleasant popular quick rare ridiculous serious smart special surprising tricky unusual weird wise
wild""")
A_WEATHER = _split("sunny rainy windy cloudy foggy snowy stormy cold hot warm cool wet dry")
# Adjective:comparative, for "The horse is faster than the dog."
COMPARATIVES = [p.replace("_", " ") for p in _split("""tall:taller short:shorter big:bigger small:smaller
old:older young:younger fast:faster slow:slower strong:stronger happy:happier heavy:heavier quick:quicker
busy:busier funny:funnier hungry:hungrier loud:louder quiet:quieter kind:kinder brave:braver wise:wiser
lazy:lazier angry:angrier noisy:noisier sleepy:sleepier good:better bad:worse little:smaller smart:smarter
tired:more_tired""")]

MANNER = _split("""quickly slowly quietly loudly happily sadly carefully gently softly suddenly badly well
hard fast early late politely kindly bravely angrily proudly patiently calmly eagerly easily fiercely
gracefully hungrily lazily nervously neatly noisily playfully rudely safely seriously shyly sleepily smoothly
silently sweetly warmly wildly wisely cheerfully busily clumsily anxiously boldly cleverly curiously excitedly
firmly gladly greedily joyfully merrily mysteriously peacefully rapidly secretly steadily strangely swiftly
thoughtfully wearily together again brightly lightly roughly sharply crossly grumpily hopefully lovingly
properly carelessly helpfully slyly""")
FREQUENCY = _split("always often sometimes usually never rarely")
DEGREE = _split("very really quite so too rather extremely")
NUMBERS = _split("two three four five six seven eight nine ten eleven twelve fifteen twenty")

# --- times -------------------------------------------------------------------------------------------

# Time phrases by tense, so "yesterday" never meets "will".
WHEN_PAST = _phrases("""yesterday|last night|last week|last year|last summer|last winter|this morning|on
Monday|on Saturday|in May|in June|at noon|after lunch|all day|all night|after school|a week ago|long ago|
once""")
WHEN_PRESENT = _phrases("""every day|every morning|every evening|every week|every summer|on Mondays|on
Sundays|in the morning|in the afternoon|in the evening|at night|after school|on weekends|before breakfast""")
WHEN_FUTURE = _phrases("""tomorrow|next week|next month|next year|next summer|on Friday|tonight|soon|later|in
the spring|after dinner|one day""")
WHEN_NOW = _phrases("now|right now|at the moment|today|this afternoon|this evening")
