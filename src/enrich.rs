//! Enrichment: the signals a team can act on, added to every contribution
//! before it is stored: clean text, language, sentiment and intent.
//!
//! Everything is read from the *prose* of a contribution: its body, with the
//! title in front for posts, tickets, mentions, messages and reviews (a
//! comment or reply carries its thread's title, which says nothing about the
//! comment), at most [`MAX_SCORED_CHARS`] characters, without fenced or
//! inline code, URLs and @mentions. A `?` in a URL or in Rust code is no
//! question, and a stack trace decides no language.
//!
//! # Language
//!
//! A language the connector set is kept. Otherwise: texts under
//! [`MIN_LANGUAGE_LETTERS`] letters get none; plainly English text (at least
//! three English function words such as "the", "and", "you", a fifth of all
//! words) is English without further ado; the rest goes to `whatlang` (on at
//! most [`DETECTION_CHARS`] characters). Its answer is used when it is
//! reliable or the text has at least [`MIN_DETECTION_LETTERS`] letters, except
//! that a text with English function words in it (two and 15% of the words
//! for a reliable answer, one and 5% otherwise) is English: product names,
//! code and short sentences often fool the trigram model.
//!
//! # Sentiment
//!
//! VADER's compound score, -1 to 1, an English-only model. When the language
//! is known and not English, sentiment is not scored: it is 0.0 and
//! `sentiment_skipped` says why. Short texts without a reliable detection
//! are scored as English. VADER reads the prose with these changes:
//! - support vocabulary (`DOMAIN_LEXICON`): politeness and product words
//!   are neutral ("please", "kindly", "help", "support", the "free" plan),
//!   problem words it does not know are negative ("crashes", "outage");
//! - "no" before a word is "not" ("no complaints"), "like" counts only after
//!   a subject or adverb ("I like it", not "would like to" or "looks like"),
//!   thanks in advance and sign-off lines ("Best,", "Thanks,") are dropped,
//!   and 🔥 is praise, not a fire;
//! - a text without a single scored word is 0 (this port otherwise turns a
//!   lone "!" into a negative score).
//!
//! Then three corrections: a positive idiom built from a negation ("couldn't
//! be happier", "can't recommend it enough") that VADER scored negative is
//! positive; sarcasm (rule 1) is negative, a positive score negated and at
//! most -[`INTENT_FLOOR`]; and sentiment agrees with the intent found below:
//! a complaint scores at most -[`INTENT_FLOOR`], praise at least
//! [`INTENT_FLOOR`], unless VADER disagrees strongly (beyond
//! ±[`STRONG_SENTIMENT`]).
//!
//! # Intent rule set
//!
//! Cues are phrases found in the lower-cased prose at word starts ("crash"
//! also finds "crashes"). A cue is *negated* when one of the four words
//! before it in its clause is a negation (not, no, never, nothing, without,
//! any "n't" word, and "nicht", "pas", "no", "não", "non", "niet", ...),
//! unless a "but" comes between: a negated complaint cue counts as praise
//! ("never had a problem", "not broken anymore") and a negated praise cue as
//! a complaint ("not great", "I don't love this"). A negation followed by a
//! product verb ("doesn't sync", "couldn't load", "never completes") is a
//! complaint cue too, and so is "no longer" in French, Portuguese and
//! Italian ("ne publie plus"). A cue after the last "but" counts twice
//! ("great explanation, but the audio cuts out"). The first rule that
//! matches wins:
//!
//! 1. `complaint` when the text is sarcastic: an explicit marker ("/s",
//!    "yeah right", "thanks for nothing", 🙃, 🙄, and the same idioms in the
//!    other supported languages), or praise used as an exclamation ("great,
//!    another outage", "oh wonderful, ...", a short "Great job." or "Very
//!    helpful.") or as a frame ("love how", "nothing says", "just what I
//!    needed") in a text that also reports trouble and says nothing was
//!    fixed. Thanks alone are never sarcasm: tickets close with them.
//! 2. `praise` when the customer confirms a fix ("that worked", "works now")
//!    or thanks or praises a fix ("thank you, that fixed it"), and nothing is
//!    "still" wrong. This comes before the ticket rules, so a ticket's "thank
//!    you, that fixed it" stays praise.
//! 3. `idea` for a suggestion: "feature request", "it would be great/nice",
//!    "please add", "could you add", "I wish", "would love to see", "any
//!    chance of", "let us ...", an offered pull request, an imperative "add
//!    ..."/"make ..." opening a sentence, and in German, French, Spanish,
//!    Portuguese, Italian and Dutch "wäre schön", "ce serait bien", "sería
//!    genial", "seria ótimo", "sarebbe bello", "zou fijn zijn", .... Ideas
//!    come before questions and complaints: a suggestion is often asked
//!    ("could you add ...?") and names the pain it would end.
//! 4. `question` for an explicit request for help or information, with or
//!    without a question mark: "how do I", "is it possible to", "is there a
//!    way", "any way to", "anyone know", "wondering if", "looking for a way
//!    to", "can't figure out", "any idea", "I would like to know", and a few
//!    per supported language ("wie kann ich", "comment puis-je", "cómo
//!    puedo", "como faço", "come posso", "hoe kan ik"). Such a text asks for
//!    help even when it names a crash. A line that opens with "how to" and
//!    has no question mark is a headline, not a question.
//! 5. `complaint` for a rhetorical question ("why is this still ...", "how
//!    hard can it be", "who decided", "who thought ... was a good idea",
//!    "seriously", "is it just me"), with or without a question mark.
//! 6. A text that asks: a `?` or `¿` (any language), a sentence or clause
//!    that opens like a question ("when is ...", "does the plan ...", but not
//!    "how great is this!", "what a release" or "when I open it"), or a
//!    request ("please advise", "kindly help", "help with", "can you check")
//!    or service request ("cancel my subscription", "delete my account",
//!    "please add our VAT ID", which is no product idea). It
//!    is a `complaint` when it reports a problem (more complaint cues than
//!    praise cues) and is angry ("??", "?!", persistence such as "still",
//!    "again", "any update", "for days", "anyone else", or sentiment at or
//!    below [`ANGRY`]), is a request, or is a support ticket (a ticket that
//!    reports a problem is a problem report, whatever it asks). Otherwise it
//!    is a `question`.
//! 7. Complaint cues (broken, doesn't work, crash, error, unable to, not
//!    receiving, wrong amount, locked out, refund, "since the update",
//!    "funktioniert nicht", "ne fonctionne pas", "no funciona", "não
//!    funciona", "non funziona", "werkt niet", ...) against praise cues
//!    (love, great, awesome, kudos, 👍, ...) and thanks ("thank", "danke",
//!    "merci", "gracias", "obrigado", "grazie", "bedankt"; thanks that come
//!    with a polite request are politeness, not praise): the side with more
//!    cues wins, sentiment decides a tie (above 0.05 is praise) and
//!    overrules a lead it strongly disagrees with (complaint cues with
//!    sentiment above 0.5 are praise, praise cues with sentiment at or below
//!    -0.5 a complaint).
//! 8. Without cues, sentiment decides: at or below -0.4 (-0.2 for support
//!    tickets and their comments) is a `complaint`, at or above 0.6 is
//!    `praise`.
//! 9. A support ticket or ticket comment that makes a request ("please",
//!    "kindly", "could you", "we need") is a `question`; any other ticket
//!    (not a ticket comment) is a `complaint`: it was opened because
//!    something is wrong, unless it says it is a test or a sample.
//! 10. `other`.
//!
//! `cargo bench --bench signals` measures the rule set against the labelled
//! set in `tests/data/signals.jsonl`.

use std::{collections::HashMap, sync::OnceLock};

use tributary_sdk::{Contribution, Intent, Kind, Signals, text::tidy};

/// Texts longer than this are scored on their start: the signal is in the
/// opening, and scoring cost grows with length.
pub const MAX_SCORED_CHARS: usize = 4_000;

/// Texts with fewer letters get no language: a few words tell too little.
pub const MIN_LANGUAGE_LETTERS: usize = 20;

/// Letters from which an unreliable language detection is still used.
pub const MIN_DETECTION_LETTERS: usize = 40;

/// The language is detected on at most this many characters.
pub const DETECTION_CHARS: usize = 1_000;

/// Complaints and sarcasm score at most minus this, praise at least this.
pub const INTENT_FLOOR: f64 = 0.25;

/// A VADER score beyond which it stands whatever the intent.
pub const STRONG_SENTIMENT: f64 = 0.5;

/// Sentiment at or below which a question that reports a problem is an
/// angry complaint.
pub const ANGRY: f64 = -0.6;

/// Adds language, sentiment and intent; tidies title and body.
pub fn enrich(contribution: &mut Contribution) {
    contribution.body = tidy(&contribution.body);
    if let Some(title) = &contribution.title {
        contribution.title = Some(tidy(title));
    }
    let own_title = !matches!(contribution.kind, Kind::Comment | Kind::Reply | Kind::TicketComment);
    let text = match &contribution.title {
        Some(title) if own_title && !title.is_empty() => format!("{title}\n{}", contribution.body),
        _ => contribution.body.clone(),
    };
    let scored: String = text.chars().take(MAX_SCORED_CHARS).collect();
    let prose = prose(&scored);
    if contribution.language.is_none() {
        contribution.language = detect_language(&prose);
    }
    let cues = Cues::find(&prose);
    let skipped = contribution
        .language
        .as_deref()
        .filter(|lang| !is_english(lang))
        .map(|lang| format!("sentiment is scored in English only; this text is {lang}"));
    let sentiment = if skipped.is_some() { 0.0 } else { sentiment(&prose, &cues) };
    let intent = classify(&cues, sentiment, contribution.kind);
    let sentiment = if skipped.is_some() { 0.0 } else { agreeing(sentiment, intent) };
    contribution.signals =
        Some(Signals { sentiment: (sentiment * 1000.0).round() / 1000.0, intent, sentiment_skipped: skipped });
}

/// The rule set of the module documentation, for a text (title and body
/// together) and the sentiment `enrich` scored for it before agreeing with
/// the intent (0.0 when it was skipped).
pub fn intent(text: &str, sentiment: f64, kind: Kind) -> Intent {
    classify(&Cues::find(&prose(text)), sentiment, kind)
}

/// The rule set of the module documentation, on the cues of a text.
fn classify(cues: &Cues, sentiment: f64, kind: Kind) -> Intent {
    let ticket = matches!(kind, Kind::Ticket | Kind::TicketComment);
    // 1. Sarcasm.
    if cues.sarcasm {
        return Intent::Complaint;
    }
    // 2. A fix confirmed or thanked for.
    if cues.resolved && !cues.unresolved && (cues.confirmed || cues.thanks || cues.praise > 0) {
        return Intent::Praise;
    }
    // 3. Suggestions.
    if cues.idea && !cues.rhetorical {
        return Intent::Idea;
    }
    // 4. Explicit requests for help or information.
    if cues.how_to {
        return Intent::Question;
    }
    // 5. Rhetorical questions.
    if cues.rhetorical {
        return Intent::Complaint;
    }
    // 6. Texts that ask.
    if cues.asks || cues.request {
        let problem = cues.reports_problem();
        let angry = cues.emphatic || cues.persistent || sentiment <= ANGRY;
        return if problem && (angry || cues.request || ticket) { Intent::Complaint } else { Intent::Question };
    }
    // 7. Complaint cues against praise cues.
    let grateful = cues.thanks && !(cues.polite && cues.praise == 0 && cues.complaint == 0);
    let praise = cues.praise + u32::from(grateful);
    if cues.complaint > 0 || praise > 0 {
        let praised = match cues.complaint.cmp(&praise) {
            std::cmp::Ordering::Greater => sentiment > 0.5,
            std::cmp::Ordering::Less => sentiment > -0.5,
            std::cmp::Ordering::Equal => sentiment > 0.05,
        };
        return if praised { Intent::Praise } else { Intent::Complaint };
    }
    // 8. Sentiment alone; 9. tickets; 10. the rest.
    if sentiment <= if ticket { -0.2 } else { -0.4 } {
        Intent::Complaint
    } else if sentiment >= 0.6 {
        Intent::Praise
    } else if ticket && cues.polite {
        Intent::Question
    } else if kind == Kind::Ticket && !cues.test {
        Intent::Complaint
    } else {
        Intent::Other
    }
}

/// What the rule set looks at, found once per text.
#[derive(Debug, Default)]
struct Cues {
    sarcasm: bool,
    /// A fix confirmed by the customer.
    confirmed: bool,
    /// A fix, confirmed or announced.
    resolved: bool,
    /// Something is still wrong.
    unresolved: bool,
    thanks: bool,
    idea: bool,
    how_to: bool,
    request: bool,
    asks: bool,
    rhetorical: bool,
    emphatic: bool,
    persistent: bool,
    polite: bool,
    /// The text says it is a test or a sample.
    test: bool,
    positive_idiom: bool,
    /// Complaint cues, negated praise cues and broken functions.
    complaint: u32,
    /// Praise cues (not thanks), negated complaint cues and positive idioms.
    praise: u32,
}

impl Cues {
    fn find(prose: &str) -> Cues {
        let mut t = normalize(prose);
        let mut cues = Cues::default();
        for idiom in POSITIVE_IDIOMS {
            if blank(&mut t, idiom) {
                cues.positive_idiom = true;
                cues.praise += 1;
            }
        }
        if blank_recommend_enough(&mut t) {
            cues.positive_idiom = true;
            cues.praise += 1;
        }
        for phrase in SERVICE {
            if blank(&mut t, phrase) {
                cues.request = true;
            }
        }
        for phrase in NEUTRAL {
            blank(&mut t, phrase);
        }
        let t = t.as_str();
        let found = phrases_in(t);
        let has = |list: List| found.iter().any(|m| m.list == list);

        let (complaint, negated_complaint) = polarity(t, &found, List::Complaint);
        let (praise, negated_praise) = polarity(t, &found, List::Praise);
        cues.complaint += complaint + negated_praise + u32::from(broken_function(t));
        cues.praise += praise + negated_complaint;

        cues.confirmed = has(List::Confirmed);
        cues.resolved = cues.confirmed || has(List::Resolved);
        cues.unresolved = has(List::Unresolved);
        cues.thanks = found.iter().any(|m| m.list == List::Thanks && !negated(t, m.at));
        cues.idea = has(List::Idea) || imperative_idea(t);
        cues.how_to = found.iter().any(|m| m.list == List::HowTo && !headline(t, m.at));
        cues.request |= has(List::Request);
        cues.rhetorical = has(List::Rhetorical)
            || sentences(t).any(|(sentence, _)| words(sentence).any(|w| w == "who") && sentence.contains("good idea"));
        cues.emphatic = t.contains("??") || t.contains("?!") || t.contains("!?");
        cues.persistent = has(List::Persistent);
        cues.polite = has(List::Polite);
        cues.test = has(List::Test);
        cues.asks = t.contains('?') || t.contains('¿') || question_opener(t);
        let trouble = complaint > 0 || has(List::Trouble);
        cues.sarcasm = has(List::SarcasmMarker)
            || (!cues.resolved && sarcastic_praise(t, has(List::SarcasmFrame), trouble, cues.thanks));
        cues
    }

    /// Complaint cues outweigh praise cues (thanks do not count: a ticket
    /// closes with "thanks" whatever it reports).
    fn reports_problem(&self) -> bool {
        self.complaint > self.praise
    }
}

// The phrase lists, by the rule that uses them. A phrase matches at the
// start of a word and may end inside one ("crash" finds "crashes"), unless
// it ends in `$` (END): "bug$" finds "bug" and "bug," but not "bugfix".

/// Marks a phrase that must end at a word boundary.
const END: char = '$';

/// Rule 1: sarcasm in any position.
#[rustfmt::skip]
const SARCASM_MARKERS: &[&str] = &[
    "/s$", "yeah right", "yeah, right", "thanks for nothing", "thank you for nothing", "thanks a lot for nothing",
    "said no one", "said nobody", "this is why we can't have nice things", "my foot$", "love that for me", "🙃",
    "🙄",
    "danke für nichts", "na toll", "merci pour rien", "gracias por nada", "obrigado por nada", "obrigada por nada",
    "grazie per niente", "grazie per nulla", "bedankt voor niks", "bedankt voor niets",
];

/// Rule 1: praise as a frame for bad news.
#[rustfmt::skip]
const SARCASM_FRAMES: &[&str] = &[
    "love how", "gotta love", "got to love", "you have to love", "i love it when", "amazing how", "impressive how",
    "i'm impressed by", "nothing says", "just what i needed", "just what we needed", "just what i wanted",
    "just what we wanted", "so glad i", "so glad we", "thrilled to", "can't wait for the next", "ah yes", "oh yes",
    "10/10 would", "lovely start", "great start", "what a great way",
];

/// Rule 1: praise words that, as a short exclamation ("Great job.",
/// "Fantastic.", "oh wonderful,"), are sarcastic next to trouble.
#[rustfmt::skip]
const PRAISE_BURSTS: &[&str] = &[
    "great", "wonderful", "brilliant", "awesome", "perfect", "lovely", "fantastic", "nice", "cool", "amazing",
    "excellent", "genius", "helpful", "appreciated", "good", "glad", "thrilled", "superb", "terrific", "impressive",
    "outstanding", "splendid", "marvelous", "fabulous", "stellar", "value", "love", "groundbreaking",
    "revolutionary",
];

/// Rule 1: trouble next to such praise, besides complaint cues.
#[rustfmt::skip]
const TROUBLE: &[&str] = &[
    "again", "another", "outage", "removed", "wiped", "logged out", "logging everyone out", "logs me out",
    "logs everyone out", "stale", "404", "twice", "breach", "expired", "without fixing", "opposite",
    "nothing at all", "finds nothing", "can't find", "cannot find", "can't keep", "days$", "weeks$",
];

/// Rule 2: the customer confirms a fix worked.
#[rustfmt::skip]
const CONFIRMED: &[&str] = &[
    "worked for me", "works for me", "that worked", "this worked", "it worked", "works now", "working now",
    "works again", "working again", "works fine now", "works like a charm", "all sorted", "sorted now",
    "funktioniert jetzt", "funktioniert wieder", "funciona todo", "ya funciona", "werkt weer",
    "fonctionne à nouveau", "funziona di nuovo",
];

/// Rule 2: a fix, announced or thanked for.
#[rustfmt::skip]
const RESOLVED: &[&str] = &[
    "fixed it", "that fixed", "this fixed", "is fixed", "got fixed", "fixed the", "fixed in", "fixed for",
    "fixed now", "fixed our", "fixed my", "your fix", "the fix worked", "worked on", "resolved", "solved",
    "sorted out", "sorted it", "all good now", "back to normal", "no longer happening", "not broken anymore",
    "foi resolvido",
];

/// Rule 2: something is still wrong, whatever was fixed.
const UNRESOLVED: &[&str] =
    &["still", "however", "unfortunately", "but now", "not fixed", "isn't fixed", "not resolved"];

/// Rule 3: suggestions.
#[rustfmt::skip]
const IDEA: &[&str] = &[
    // Labelled and hypothetical.
    "feature request", "feature idea", "feature suggestion", "feature:", "idea:", "integration idea", "proposal",
    "suggestion", "i suggest", "we suggest", "i'd suggest", "would suggest", "suggest a", "suggest adding",
    "is suggested", "wishlist", "wish list", "small request", "i wish", "we wish", "really wish", "wish they",
    "wish you", "wish there", "wish it", "imagine if",
    "would love to see", "would love a", "i'd love", "we'd love", "i would love", "we would love",
    "it would be great", "it would be nice", "it would be useful", "it would be helpful", "it would help",
    "would be nice", "would be great", "would be cool", "would be awesome", "would be neat", "would be helpful",
    "would be useful", "would be handy", "would be super", "would be amazing", "would be better",
    "would help$", "would save", "would it make sense", "really needs", "would help a lot", "would make", "would let",
    "would allow", "it'd be", "being able to",
    "if they added", "if you added", "if they add", "if you add", "if you could add", "i'd pay", "i would pay",
    "would pay for", "really need is", "what we need is", "what i'd really want", "what i really want",
    // Asked for.
    "please add", "pls add", "plz add", "please make", "please consider", "please allow", "please bring",
    "please support", "could you add", "can you add", "could you please add", "could you make", "can you make",
    "possible to add", "can we get a", "can we have", "could we have", "could we get", "add support for",
    "allow us to", "let us", "give us", "bring back", "please do", "any chance", "any plans to",
    "any plans for", "plans to add", "+1 for", "+1 on", "maybe also",
    "should let", "should add", "should support", "should allow", "should offer", "should ship", "should have a",
    "should really", "should be able", "should be an option", "you should", "they should",
    // Offered.
    "open a pr", "send a pr", "submit a pr", "a pr that", "happy to contribute",
    // de, fr, es, pt, it, nl.
    "wäre schön", "wäre toll", "wäre super", "wäre gut", "wäre praktisch", "wäre es möglich", "könnten sie bitte",
    "könntet ihr", "ce serait bien", "ce serait génial", "ce serait top", "ce serait pratique", "il faudrait",
    "serait-il possible", "sería genial", "sería bueno", "sería útil", "estaría bien", "podrías agregar",
    "podrias agregar", "podrían agregar", "seria ótimo", "seria bom", "seria legal", "seria útil",
    "sarebbe bello", "sarebbe utile", "sarebbe ottimo", "sarebbe fantastico", "zou fijn zijn", "zou handig zijn",
    "zou mooi zijn", "zou top zijn",
];

/// Rule 4: explicit requests for help or information.
#[rustfmt::skip]
const HOW_TO: &[&str] = &[
    "how do i", "how do you", "how do we", "how can i", "how can we", "how would i", "how should i", "how to",
    "is it possible", "is there a way", "is there any way", "any way to", "anyway to", "anyone know",
    "anybody know", "does anyone", "has anyone", "did anyone", "anyone here", "wondering if", "wondering whether",
    "wondering how", "i wonder", "looking for a way", "looking for recommendations", "can't figure out",
    "cannot figure out", "trying to figure out", "where do i", "where can i", "where to", "what's the difference",
    "what is the difference", "not sure how", "what am i doing wrong", "what can i do", "what should i do",
    "i would like to know", "i'd like to know", "we would like to know", "i need to know", "we need to know",
    "curious what", "curious how", "curious whether", "curious if", "any idea", "any ideas", "any suggestions",
    "any help", "any tips", "tips welcome", "any pointers", "pointers appreciated", "could someone clarify",
    "can someone explain", "could someone explain",
    // de, fr, es, pt, it, nl.
    "wie kann ich", "wie kann man", "gibt es eine möglichkeit", "ist es möglich", "weiß jemand",
    "ich würde gerne wissen", "ich möchte wissen", "comment puis-je", "comment faire", "est-ce que",
    "est-il possible", "quelqu'un sait", "je voudrais savoir", "j'aimerais savoir", "cómo puedo", "como puedo",
    "cómo hago", "como hago", "alguien sabe", "alguien me podría", "puedes explicar", "qué puedo hacer",
    "que puedo hacer", "es posible", "me gustaría saber", "quisiera saber", "como faço", "como posso",
    "gostaria de saber", "alguém sabe", "é possível", "come posso", "qualcuno sa", "come si fa", "è possibile",
    "vorrei sapere", "hoe kan ik", "hoe kun je", "weet iemand", "is het mogelijk", "ik zou graag willen weten",
    "ik wil graag weten",
];

/// Rule 5: rhetorical questions.
#[rustfmt::skip]
const RHETORICAL: &[&str] = &[
    "how hard can", "how hard is it", "how is this still", "why is this still", "why is it still",
    "why does it still", "why is this not", "why was this closed", "why do i have to", "why on earth",
    "why the hell", "why would you", "just why", "who decided", "who thought", "who approved", "what the f", "wtf",
    "are you kidding", "are you serious", "seriously", "is it just me", "is anyone actually",
    "does anyone actually", "someone actually", "anyone actually", "anyone there", "is this a joke",
    "how many times do i", "how many times have i", "how many more times", "is a joke$", "come on$",
];

/// Rule 6: help and service requests.
#[rustfmt::skip]
const REQUEST: &[&str] = &[
    "please advise", "kindly advise", "kindly assist", "kindly help", "please help", "help with", "need help",
    "can you help", "could you help", "can someone help", "help me", "can you check", "could you check",
    "can you confirm", "could you confirm", "could you please confirm", "please confirm", "could someone",
    "can someone", "can anyone", "request:", "cancel my", "cancel our", "delete my account", "delete our account",
    "close my account", "close our account", "upgrade to", "downgrade", "send a quote", "send us a quote",
    "send me a copy", "transfer ownership", "want to cancel", "like to cancel", "por favor ayud", "bitte um hilfe",
];

/// Rule 6: the problem goes on.
#[rustfmt::skip]
const PERSISTENT: &[&str] = &[
    "still", "again", "any update", "following up", "it's been", "yet another", "every time", "every single time",
    "for a week", "for weeks", "for days", "for hours", "days ago", "weeks ago", "anyone else", "yet$",
];

/// Rule 7: problem reports and dissatisfaction.
#[rustfmt::skip]
const COMPLAINT: &[&str] = &[
    // It does not work.
    "broken", "broke$", "breaks$", "doesn't work", "does not work", "didn't work", "don't work", "isn't working",
    "not working", "stopped$", "no longer works", "won't load", "not loading", "isn't loading", "doesn't load",
    "does nothing", "fail", "crash", "freez", "hang$", "hangs$", "hanging$", "died$", "dies$", "bug$", "bugs$",
    "buggy", "error", "glitch", "unresponsive", "blank page", "white screen", "memory leak", "problem", "issues$",
    "issue with", "having trouble", "went wrong", "ate$", "eats$", "out of control", "unreadable", "outdated",
    // Cannot get in, data gone or wrong, slow, down.
    "unable to", "can't log", "cannot log", "can't access", "cannot access", "can't get into", "can't sign in",
    "can't send", "locked out", "logged out", "logged me out", "logs me out", "log me out", "logging me out",
    "kicks me out",
    "kicked out", "not receiving", "not getting", "never arriv", "never appear", "never reach", "not showing",
    "missing", "disappear", "lost$", "lose$", "loses", "wrong", "incorrect", "doesn't match", "don't match",
    "duplicated$", "stuck", "slow", "laggy", "late$", "delayed", "timeout", "times out", "timed out", "outage",
    "is down", "went down", "rejected", "going to spam", "too many requests", "internal server error",
    "bad gateway", "service unavailable", "unauthorized", "forbidden", "429s", "500s", "502s", "503s",
    "blocks us", "blocks our", "blocking us", "blocker", "urgent", "asap", "immediately", "ignores", "ignored",
    "takes forever", "spins forever", "loads forever", "spinning forever", "no answer", "no way to", "no option to",
    "no notice", "can reproduce", "reproducible", "steps to reproduce", "repro:", "confusing", "harder to",
    "third time", "fourth time", "once again", "churn", "price hike", "price increase", "cuts out", "cutting out",
    "drops out", "way too", "far too", "too low", "too high", "too slow", "too small", "too expensive", "too many",
    "too hard", "too complicated", "expected:", "expected behavio", "expected it to",
    "expected them to", "supposed to",
    // Billing.
    "refund", "charged$", "charged twice", "double charged", "charged me", "overcharg", "billed for",
    // Dissatisfaction.
    "frustrat", "annoy", "drives me", "terrible", "awful", "horrible", "unusable", "useless", "unacceptable",
    "ridiculous", "absurd", "insane$", "disappoint", "worst", "bad$", "worse$", "hate", "sucks", "garbage",
    "waste of", "not ok", "not okay", "not acceptable", "don't like", "didn't like", "do not like", "never again",
    "doesn't help", "didn't help", "does not help", "complain", "migrating off", "moving off", "no reply",
    "no response", "nobody from", "please fix", "fix this",
    // Still wrong, or wrong since a change.
    "keeps$", "keep getting", "keep seeing", "still happening", "still happens", "still there", "still getting",
    "still get$", "still not", "still no$", "still can't", "still cannot", "still doesn't", "still don't",
    "still isn't", "still won't", "still broken", "still failing", "still charged", "still reproducible",
    "still shows", "still counts", "still see", "still has", "still says", "still waiting",
    "since the update", "since the last", "since the latest", "since the new", "since the migration",
    "since the release", "since the outage", "since upgrading", "since yesterday", "since this morning",
    "since today", "since last", "since monday", "since tuesday", "since wednesday", "since thursday",
    "since friday",
    // de, fr, es, pt, it, nl.
    "funktioniert nicht", "geht nicht", "kaputt", "fehler", "absturz", "abstürz", "stürzt", "ausfall", "doppelt",
    "erstatt", "ne fonctionne pas", "ne fonctionne plus", "ne marche pas", "marche plus", "impossible de",
    "erreur", "plantage", "déçu", "rembours", "no funciona", "no anda", "no sirve", "falla", "duplicado",
    "reembols", "não funciona", "não consigo", "erro$", "travando", "duplicada", "non funziona", "non riesco",
    "errore", "disservizio", "rimbors", "werkt niet", "kapot", "foutmelding", "storing", "onbruikbaar",
    "terugbetal", "nicht mehr", "niet meer", "ya no", "no aparece", "não aparece", "n'apparaît pas", "erscheint nicht",
    "wird nicht angezeigt",
    "non compare", "verschijnt niet",
];

/// Rule 7: praise (thanks are [`THANKS`]).
#[rustfmt::skip]
const PRAISE: &[&str] = &[
    "love", "loving", "love it", "kudos", "great", "good job", "good$", "nice", "nice touch", "nicely done",
    "well done", "well designed", "awesome", "fantastic", "amazing", "excellent", "brilliant", "superb",
    "impressive", "impressed", "delight", "lovely", "perfect", "helpful", "shoutout", "shout out", "rocks$",
    "you rock", "lifesaver", "life saver", "saved my", "saved me", "saved us", "the best", "happy", "happier",
    "enjoy", "glad", "pleased", "recommend", "exactly what", "works great", "works perfectly", "works well",
    "like a charm", "solid", "smooth", "chef's kiss", "lgtm", "+1$", "i like", "we like", "really like",
    "a fan$", "big fan", "fan of", "cute", "neat$", "slick", "polished", "intuitive", "elegant", "beautiful",
    "gorgeous", "snappy", "stellar", "flawless", "seamless", "game changer", "game-changer", "so much better",
    "much better", "way better", "so good", "really good", "pretty good", "painless", "effortless", "easy to use",
    "improvement$", "👍", "🙌", "❤", "🔥", "🎉", "💯", "😍",
    // de, fr, es, pt, it, nl.
    "toll", "klasse", "gute arbeit", "super arbeit", "génial", "bravo", "bon travail", "excelente", "genial",
    "buen video", "buen vídeo", "buen trabajo", "ótimo", "bom trabalho", "ottimo", "ottimo lavoro", "bel lavoro",
    "goed werk", "goed gedaan", "gelungen", "sehr gut", "perfekt", "j'adore", "parfait", "me encanta",
    "me encantó", "perfecto", "adorei", "adoro", "muito bom", "perfeito", "perfetto", "molto bene", "geweldig",
    "fantastisch",
];

/// Rule 7: thanks.
#[rustfmt::skip]
const THANKS: &[&str] = &[
    "thank", "thx", "cheers", "appreciate", "danke", "vielen dank", "merci", "gracias", "obrigad", "grazie",
    "bedankt", "dank je", "dankjewel",
];

/// Rule 7: praise built from a negation; its words are not read as negated.
#[rustfmt::skip]
const POSITIVE_IDIOMS: &[&str] = &[
    "couldn't be happier", "could not be happier", "can't be happier", "couldn't ask for", "could not ask for",
    "can't complain", "cannot complain", "nothing to complain", "no complaints", "nothing but good",
    "nothing but praise", "not bad", "isn't bad", "never disappoint", "can't fault", "not gonna lie",
    "nobody wants to go back", "never going back", "won't go back", "wouldn't go back", "never looked back",
    "never look back",
];

/// Rule 7: phrases that look negated or grateful but are neither praise nor
/// complaint.
#[rustfmt::skip]
const NEUTRAL: &[&str] = &[
    "no problem", "not a problem", "no worries", "bug fix", "bugfix", "problem report", "thanks in advance",
    "thank you in advance", "thanks for your help in advance", "danke im voraus", "merci d'avance",
    "gracias de antemano", "gracias anticipadas", "desde ya muchas gracias", "obrigado desde já",
    "grazie in anticipo", "alvast bedankt",
    // Staff acknowledgements and how-to pointers are no praise or question.
    "thanks for reporting", "thank you for reporting", "thanks for the report", "thank you for the report",
    "thanks everyone for the report", "thanks for the detailed report", "thank you for the detailed report",
    "here is how to", "here's how to", "learn how to", "see how to",
    "shows how to", "explains how to",
];

/// Rule 6: changes to one's own account, not the product: service
/// requests, not ideas ("please add our VAT ID to the invoices").
#[rustfmt::skip]
const SERVICE: &[&str] = &[
    "please add our", "please add my", "please add me", "please add us", "please update our", "please update my",
    "please change our", "please change my", "please remove our", "please remove my",
];

/// Rules 7 and 9: polite requests.
#[rustfmt::skip]
const POLITE: &[&str] = &[
    "please", "pls$", "kindly", "could you", "can you", "would you", "we need", "i need", "would like", "we'd like",
    "i'd like", "bitte", "por favor", "s'il vous plaît", "per favore", "alstublieft", "graag",
];

/// Rule 9: a ticket that says it is a test or a sample is no complaint.
const TEST: &[&str] = &["test$", "tests$", "testing$", "sample ticket", "please ignore", "ignore this"];

/// Rule 6: words that open a question at the start of a sentence.
const WH_OPENERS: &[&str] = &["how", "what", "what's", "why", "when", "where", "where's", "who", "which"];

/// Rule 6: auxiliaries that open a question at the start of a sentence or
/// clause, when a subject follows ("does the plan ...").
#[rustfmt::skip]
const AUX_OPENERS: &[&str] =
    &["can", "could", "would", "will", "does", "do", "did", "is", "are", "should", "has", "have", "any", "anyone"];
#[rustfmt::skip]
const SUBJECTS: &[&str] = &[
    "i", "you", "we", "it", "this", "that", "there", "they", "he", "she", "anyone", "anybody", "someone", "somebody",
    "the", "my", "our", "your", "a", "an", "any", "these", "those", "update", "way", "chance", "idea", "else",
];

/// Rule 6: "how great is this!", "what a release": exclamations.
#[rustfmt::skip]
const EXCLAMATIVE: &[&str] = &[
    "a", "an", "great", "cool", "nice", "awesome", "amazing", "lovely", "wonderful", "good", "beautiful", "fast",
    "easy", "much", "well", "fun", "neat", "helpful", "useful", "brilliant", "smooth", "clean", "simple", "quickly",
];

/// The lists found in one pass over a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum List {
    SarcasmMarker,
    SarcasmFrame,
    Trouble,
    Confirmed,
    Resolved,
    Unresolved,
    Idea,
    HowTo,
    Rhetorical,
    Request,
    Persistent,
    Complaint,
    Praise,
    Thanks,
    Polite,
    Test,
}

const LISTS: &[(List, &[&str])] = &[
    (List::SarcasmMarker, SARCASM_MARKERS),
    (List::SarcasmFrame, SARCASM_FRAMES),
    (List::Trouble, TROUBLE),
    (List::Confirmed, CONFIRMED),
    (List::Resolved, RESOLVED),
    (List::Unresolved, UNRESOLVED),
    (List::Idea, IDEA),
    (List::HowTo, HOW_TO),
    (List::Rhetorical, RHETORICAL),
    (List::Request, REQUEST),
    (List::Persistent, PERSISTENT),
    (List::Complaint, COMPLAINT),
    (List::Praise, PRAISE),
    (List::Thanks, THANKS),
    (List::Polite, POLITE),
    (List::Test, TEST),
];

/// One occurrence of a phrase.
#[derive(Debug, Clone, Copy)]
struct Found {
    list: List,
    phrase: &'static str,
    at: usize,
}

/// The phrases of [`LISTS`] by their first characters (at most
/// [`KEY_CHARS`], fewer when the first word is shorter), so one pass over
/// the word starts of a text finds them all; phrases that do not start with
/// a letter or digit ("/s", "+1", emoji) are searched for directly.
struct PhraseIndex {
    by_key: HashMap<&'static str, Vec<(List, &'static str)>>,
    unkeyed: Vec<(List, &'static str)>,
}

const KEY_CHARS: usize = 3;

fn phrase_index() -> &'static PhraseIndex {
    static INDEX: OnceLock<PhraseIndex> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut index = PhraseIndex { by_key: HashMap::new(), unkeyed: Vec::new() };
        for &(list, phrases) in LISTS {
            for &phrase in phrases {
                if !phrase.chars().next().is_some_and(char::is_alphanumeric) {
                    index.unkeyed.push((list, phrase));
                    continue;
                }
                let first_word = phrase.split([' ', END]).next().unwrap_or(phrase);
                let key_end = first_word.char_indices().nth(KEY_CHARS).map_or(first_word.len(), |(i, _)| i);
                index.by_key.entry(&first_word[..key_end]).or_default().push((list, phrase));
            }
        }
        index
    })
}

/// Every occurrence of every listed phrase in `t`, in no particular order.
fn phrases_in(t: &str) -> Vec<Found> {
    let index = phrase_index();
    let mut found = Vec::new();
    for &(list, phrase) in &index.unkeyed {
        found.extend(occurrences(t, phrase).map(|at| Found { list, phrase, at }));
    }
    let mut previous_alphanumeric = false;
    for (at, c) in t.char_indices() {
        let alphanumeric = c.is_alphanumeric();
        if alphanumeric && !previous_alphanumeric {
            let rest = &t[at..];
            let mut ends = rest.char_indices().map(|(i, _)| i).skip(1).chain(std::iter::once(rest.len()));
            for _ in 0..KEY_CHARS {
                let Some(end) = ends.next() else { break };
                let Some(candidates) = index.by_key.get(&rest[..end]) else { continue };
                for &(list, phrase) in candidates {
                    if matches_at(rest, phrase) {
                        found.push(Found { list, phrase, at });
                    }
                }
            }
        }
        previous_alphanumeric = alphanumeric;
    }
    found
}

/// Whether `rest` starts with `phrase` (ending at a word boundary when the
/// phrase ends in [`END`]).
fn matches_at(rest: &str, phrase: &str) -> bool {
    match phrase.strip_suffix(END) {
        Some(needle) => {
            rest.starts_with(needle) && rest[needle.len()..].chars().next().is_none_or(|c| !c.is_alphanumeric())
        }
        None => rest.starts_with(phrase),
    }
}

/// Byte offsets where `phrase` starts a word in `t`; a phrase ending in
/// [`END`] must also end one.
fn occurrences<'a>(t: &'a str, phrase: &'a str) -> impl Iterator<Item = usize> + 'a {
    let (needle, whole) = match phrase.strip_suffix(END) {
        Some(needle) => (needle, true),
        None => (phrase, false),
    };
    let starts_alnum = needle.chars().next().is_some_and(char::is_alphanumeric);
    t.match_indices(needle).map(|(at, _)| at).filter(move |&at| {
        let start_ok = !starts_alnum || t[..at].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
        let end_ok = !whole || t[at + needle.len()..].chars().next().is_none_or(|c| !c.is_alphanumeric());
        start_ok && end_ok
    })
}

/// Replaces every occurrence of `phrase` with spaces; whether there was one.
fn blank(t: &mut String, phrase: &str) -> bool {
    let found: Vec<usize> = occurrences(t, phrase).collect();
    let len = phrase.trim_end_matches(END).len();
    for &at in &found {
        t.replace_range(at..at + len, &" ".repeat(len));
    }
    !found.is_empty()
}

/// Blanks "can't recommend it enough", "cannot thank you enough"; whether
/// there was one.
fn blank_recommend_enough(t: &mut String) -> bool {
    const WINDOW: usize = 48;
    let mut found = None;
    for phrase in ["can't recommend", "cannot recommend", "can't thank", "cannot thank", "can't praise"] {
        found = occurrences(t, phrase).find_map(|at| {
            let window = &t[at..];
            let window = &window[..window.char_indices().nth(WINDOW).map_or(window.len(), |(i, _)| i)];
            window.find("enough").map(|end| (at, at + end + "enough".len()))
        });
        if found.is_some() {
            break;
        }
    }
    let Some((start, end)) = found else { return false };
    t.replace_range(start..end, &" ".repeat(end - start));
    true
}

/// How many phrases of a list occur plainly and how many only negated.
/// Each phrase counts once, twice when it comes after the last "but" ("great
/// explanation, but the audio cuts out": what follows the "but" is the
/// point).
fn polarity(t: &str, found: &[Found], list: List) -> (u32, u32) {
    let last_but = ["but", "however", "aber", "pero", "maar"]
        .iter()
        .filter_map(|but| occurrences(t, but).filter(|&at| matches_at(&t[at..], &format!("{but}$"))).last())
        .max();
    // (phrase, weight as plain, weight as negated)
    let mut phrases: Vec<(&str, u32, u32)> = Vec::new();
    for m in found.iter().filter(|m| m.list == list) {
        let weight = if last_but.is_some_and(|but| m.at > but) { 2 } else { 1 };
        let (plain, inverted) = if negated(t, m.at) { (0, weight) } else { (weight, 0) };
        match phrases.iter_mut().find(|(phrase, _, _)| *phrase == m.phrase) {
            Some((_, p, n)) => {
                *p = (*p).max(plain);
                *n = (*n).max(inverted);
            }
            None => phrases.push((m.phrase, plain, inverted)),
        }
    }
    let plain = phrases.iter().map(|(_, p, _)| p).sum();
    let inverted = phrases.iter().filter(|(_, p, _)| *p == 0).map(|(_, _, n)| n).sum();
    (plain, inverted)
}

/// Whether one of the four words before `at`, in the same clause, negates
/// it (a "but" in between cancels the negation: "nothing but good").
fn negated(t: &str, at: usize) -> bool {
    const NEGATORS: &[&str] = &[
        "not", "no", "never", "nothing", "nobody", "none", "neither", "nor", "without", "hardly", "barely", "zero",
        "cannot", "nicht", "kein", "keine", "pas", "jamais", "nunca", "nada", "não", "non", "niet", "geen", "nooit",
    ];
    let before = &t[..at];
    let clause = before.rfind(['.', '!', '?', ';', ',', ':', '\n', '(', '"', '-']).map_or(0, |p| p + 1);
    for word in before[clause..].split_whitespace().rev().take(4) {
        let word = word.trim_matches(|c: char| !c.is_alphanumeric() && c != '\'');
        if word == "but" {
            return false;
        }
        if NEGATORS.contains(&word) || word.ends_with("n't") {
            return true;
        }
    }
    false
}

/// Whether the text says a product function does not work: a negation
/// followed, within a few words, by a verb such as load, sync, open, save,
/// send, export ("it still doesn't sync", "couldn't load a single board",
/// "the callback never completes"), or something no longer happens in
/// French, Portuguese or Italian ("ne publie plus").
fn broken_function(t: &str) -> bool {
    #[rustfmt::skip]
    const FUNCTIONS: &[&str] = &[
        "load", "open", "save", "saving", "sync", "work", "show", "connect", "log", "sign", "send", "receiv", "upload",
        "download", "export", "import", "start", "run", "updat", "display", "appear", "respond", "print", "install",
        "access", "render", "refresh", "arriv", "fire", "firing", "trigger", "match", "play", "complet", "finish",
        "launch", "boot", "recogni", "accept", "redirect", "authenticat", "verif", "submit", "process", "reset",
        "delet", "stay", "persist", "apply", "applies", "notif", "come", "let", "answer", "repl", "attach",
        "support",
    ];
    #[rustfmt::skip]
    const FILLERS: &[&str] = &[
        "even", "always", "properly", "really", "ever", "actually", "correctly", "reliably", "seem", "seems", "to",
        "be",
    ];
    let words: Vec<&str> = words(t).collect();
    // "ne ... plus", "não ... mais", "non ... più": no longer (it stopped).
    let no_longer = words.iter().enumerate().any(|(i, word)| {
        let until = match *word {
            "ne" => "plus",
            "não" => "mais",
            "non" => "più",
            w if w.starts_with("n'") => "plus",
            _ => return false,
        };
        words[i + 1..].iter().take(3).any(|w| *w == until)
    });
    no_longer
        || words.iter().enumerate().any(|(i, word)| {
            let negation = matches!(*word, "not" | "never" | "cannot" | "nothing" | "nobody") || word.ends_with("n't");
            negation
                && words[i + 1..]
                    .iter()
                    .filter(|w| !FILLERS.contains(w))
                    .take(1)
                    .any(|w| FUNCTIONS.iter().any(|f| w.starts_with(f)))
        })
}

/// "How to set up SSO in 5 minutes": a line opening with "how to" and
/// without a question mark is a headline, not a question.
fn headline(t: &str, at: usize) -> bool {
    let line_start = t[..at].rfind('\n').map_or(0, |p| p + 1);
    let line_end = t[at..].find('\n').map_or(t.len(), |p| at + p);
    t[line_start..at].trim().is_empty() && t[at..].starts_with("how to") && !t[at..line_end].contains('?')
}

/// Sentences of the text, each with whether it ended in an exclamation mark.
fn sentences(t: &str) -> impl Iterator<Item = (&str, bool)> {
    let mut rest = t;
    std::iter::from_fn(move || {
        loop {
            if rest.is_empty() {
                return None;
            }
            // A full stop ends a sentence when a space or the end follows
            // ("v4.13.1", "78.8%" and "e.g." do not end one).
            let end = rest
                .char_indices()
                .find(|&(i, c)| {
                    matches!(c, '!' | '?' | '\n')
                        || (c == '.' && rest[i + 1..].chars().next().is_none_or(char::is_whitespace))
                })
                .map_or(rest.len(), |(i, _)| i);
            let sentence = &rest[..end];
            let exclaimed = rest[end..].starts_with('!');
            rest = rest.get(end + 1..).unwrap_or("");
            if !sentence.trim().is_empty() {
                return Some((sentence.trim(), exclaimed));
            }
        }
    })
}

fn words(s: &str) -> impl Iterator<Item = &str> {
    s.split(|c: char| c.is_whitespace() || matches!(c, ',' | ':' | ';' | '(' | ')' | '"' | '*' | '_'))
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric() && c != '\'' && c != '/'))
        .filter(|w| !w.is_empty())
}

/// A sentence that opens like a question: "when is ...", "does the plan
/// ...". Not "how great is this!", "what a release", "when I open it ...".
/// After a colon or a comma ("hey, just checking: does the plan ..."), only
/// an auxiliary opens a question: "..., which was broken" is a statement.
fn question_opener(t: &str) -> bool {
    sentences(t).any(|(sentence, exclaimed)| {
        !exclaimed
            && sentence.split([':', ';', ',']).enumerate().any(|(n, clause)| {
                let mut w = words(clause);
                let (Some(first), Some(second)) = (w.next(), w.next()) else { return false };
                if w.next().is_none() {
                    return false;
                }
                if WH_OPENERS.contains(&first) {
                    n == 0
                        && !EXCLAMATIVE.contains(&second)
                        && !matches!(second, "i" | "we" | "you" | "i'd" | "i'm" | "they" | "to")
                } else {
                    AUX_OPENERS.contains(&first) && SUBJECTS.contains(&second)
                }
            })
    })
}

/// An imperative suggestion opening a sentence or following a colon:
/// "make X an available reaction", "Small request: add ...".
fn imperative_idea(t: &str) -> bool {
    const VERBS: &[&str] = &["make", "add", "allow", "bring"];
    t.split(['.', '!', '?', '\n', ':']).any(|clause| {
        let mut w = words(clause);
        w.next().is_some_and(|first| VERBS.contains(&first)) && w.count() >= 3
    })
}

/// Rule 1 without the explicit markers: praise as an exclamation or a
/// frame, next to trouble (or frame and exclamation together, without
/// thanks).
fn sarcastic_praise(t: &str, frame: bool, trouble: bool, thanks: bool) -> bool {
    let burst =
        sentences(t).any(|(sentence, _)| {
            let w: Vec<&str> = words(sentence).collect();
            w.len() <= 3 && short_praise(&w)
        }) || t.split(['.', '!', '?', '\n', ',', ':', ';']).find(|c| !c.trim().is_empty()).is_some_and(|clause| {
            let w: Vec<&str> = words(clause).collect();
            w.len() <= 3 && short_praise(&w)
        });
    (frame || burst) && (trouble || (frame && burst && !thanks))
}

/// A few words of praise without thanks: "great", "oh wonderful", "really
/// great value".
fn short_praise(words: &[&str]) -> bool {
    words.iter().any(|w| PRAISE_BURSTS.contains(w)) && !words.iter().any(|w| w.starts_with("thank"))
}

fn is_english(code: &str) -> bool {
    code == "eng" || code == "en" || code.starts_with("en-")
}

/// ISO 639-3 code of the text's language, when it can be told; see the
/// module documentation.
fn detect_language(prose: &str) -> Option<String> {
    let letters = prose.chars().filter(|c| c.is_alphabetic()).count();
    if letters < MIN_LANGUAGE_LETTERS {
        return None;
    }
    let (hits, words) = english_function_words(prose);
    if hits >= 3 && hits * 100 >= words * 20 {
        // Plainly English: no need for the trigram model.
        return Some("eng".to_owned());
    }
    // The opening says which language it is; trigram scoring grows with
    // length.
    let sample = &prose[..prose.char_indices().nth(DETECTION_CHARS).map_or(prose.len(), |(i, _)| i)];
    let info = whatlang::detect(sample)?;
    if info.lang() == whatlang::Lang::Eng {
        return Some("eng".to_owned());
    }
    let english = if info.is_reliable() {
        hits >= 2 && hits * 100 >= words * 15
    } else if letters >= MIN_DETECTION_LETTERS {
        hits >= 1 && hits * 100 >= words * 5
    } else {
        return None;
    };
    Some(if english { "eng".to_owned() } else { info.lang().code().to_owned() })
}

/// How many of the words are English function words, and how many words
/// there are. The list leaves out words that are also common in the other
/// languages detected here ("a", "i", "in", "is", "me", "no", "of", "on",
/// "so", "was", "we", "will").
fn english_function_words(prose: &str) -> (usize, usize) {
    const FUNCTION_WORDS: &[&str] = &[
        "the", "and", "to", "it", "you", "this", "that", "for", "with", "my", "our", "your", "not", "but", "are",
        "have", "has", "can", "does", "don't", "doesn't", "i'm", "it's", "i've", "i'll", "i'd", "be", "just", "from",
        "there", "what", "how", "they", "would", "should", "when", "after", "still", "about", "if",
    ];
    let (mut words, mut hits) = (0usize, 0usize);
    for word in prose.split(|c: char| !c.is_alphanumeric() && c != '\'' && c != '’') {
        if word.is_empty() {
            continue;
        }
        words += 1;
        let lower = word.to_lowercase().replace('’', "'");
        if FUNCTION_WORDS.contains(&lower.as_str()) {
            hits += 1;
        }
    }
    (hits, words)
}

/// VADER with [`DOMAIN_LEXICON`] on top of its own lexicon.
fn analyzer() -> &'static vader_sentiment::SentimentIntensityAnalyzer<'static> {
    static ANALYZER: OnceLock<vader_sentiment::SentimentIntensityAnalyzer<'static>> = OnceLock::new();
    ANALYZER.get_or_init(|| {
        let mut lexicon = (*vader_sentiment::LEXICON).clone();
        for (word, valence) in DOMAIN_LEXICON {
            lexicon.insert((*word).into(), *valence);
        }
        // Built once per process and used for its whole life.
        vader_sentiment::SentimentIntensityAnalyzer::from_lexicon(Box::leak(Box::new(lexicon)))
    })
}

/// Valences for the words of support text that VADER's social-media lexicon
/// gets wrong: politeness and product words it reads as praise ("please",
/// "kindly", "help", "support", "free" plan, "clear" the cache, "kind"
/// regards) are neutral, and problem words it does not know ("crashes",
/// "outage", "unusable") are negative.
#[rustfmt::skip]
const DOMAIN_LEXICON: &[(&str, f64)] = &[
    ("please", 0.0), ("kindly", 0.0), ("kind", 0.0), ("help", 0.0), ("support", 0.0), ("supports", 0.0),
    ("supported", 0.0), ("free", 0.0), ("welcome", 0.0), ("curious", 0.0), ("share", 0.0), ("credit", 0.0),
    ("credited", 0.0), ("sure", 0.0), ("ok", 0.0), ("okay", 0.0), ("yes", 0.0), ("dear", 0.0), ("active", 0.0),
    ("clear", 0.0), ("party", 0.0), ("join", 0.0), ("save", 0.0), ("wish", 0.0), ("want", 0.0), ("crashes", -1.7),
    ("crashed", -1.7), ("crashing", -1.7), ("bug", -1.2), ("bugs", -1.2), ("buggy", -1.8), ("unable", -1.2),
    ("outage", -1.8), ("outages", -1.8), ("downtime", -1.2), ("timeout", -1.0), ("timeouts", -1.0), ("slow", -1.2),
    ("slower", -1.2), ("sluggish", -1.2), ("laggy", -1.5), ("unusable", -2.3), ("unresponsive", -1.5),
    ("freezes", -1.5), ("frozen", -1.0), ("glitch", -1.2), ("glitchy", -1.5), ("regression", -1.2),
    ("overcharged", -2.0), ("expired", -0.8), ("incorrect", -1.5),
];

/// VADER's compound score with the corrections of the module documentation.
fn sentiment(prose: &str, cues: &Cues) -> f64 {
    if prose.trim().is_empty() {
        return 0.0;
    }
    let input = vader_input(prose);
    let scores = analyzer().polarity_scores(&input);
    let part = |name: &str| scores.get(name).copied().unwrap_or(0.0);
    // Without a single scored word this port still turns "!" and "?" into
    // a negative score ("hello!" is -0.08): that is no sentiment.
    let mut score = if part("pos") == 0.0 && part("neg") == 0.0 { 0.0 } else { part("compound") };
    if cues.positive_idiom && score < 0.0 {
        score = -score;
    }
    if cues.sarcasm {
        score = -score.abs().max(INTENT_FLOOR);
    }
    score
}

/// The text as VADER should read it: "no" directly before a word is "not"
/// (this VADER port scores "no" as a negative word and not as a negation),
/// "like" is dropped unless it follows a subject or an adverb ("I like it"
/// stays, "would like to", "looks like" and "something like" go), sign-off
/// lines and thanks in advance are dropped (politeness, not sentiment), and
/// 🔥 is praise, not a fire.
fn vader_input(text: &str) -> String {
    #[rustfmt::skip]
    const LIKERS: &[&str] = &[
        "i", "we", "they", "you", "really", "don't", "didn't", "doesn't", "do", "does", "not", "also", "still",
        "definitely", "actually", "totally", "people", "everyone", "genuinely", "honestly",
    ];
    #[rustfmt::skip]
    const SIGN_OFFS: &[&str] = &[
        "best", "best regards", "kind regards", "warm regards", "regards", "cheers", "all the best", "best wishes",
        "thanks", "thank you", "many thanks", "thanks again", "thx", "ty",
    ];
    let mut out = String::with_capacity(text.len() + 8);
    for (n, line) in text.split('\n').enumerate() {
        if n > 0 {
            out.push('\n');
            let bare = line.trim().trim_end_matches([',', '.', '!']).to_lowercase();
            // A sign-off after the message is politeness, not sentiment.
            if SIGN_OFFS.contains(&bare.as_str()) {
                continue;
            }
        }
        let mut previous = String::new();
        let mut words = line.split(' ').peekable();
        let mut first = true;
        while let Some(word) = words.next() {
            let bare = word.trim_matches(|c: char| !c.is_alphanumeric() && c != '\'').to_lowercase();
            let next_is_word = words.peek().and_then(|w| w.chars().next()).is_some_and(char::is_alphabetic);
            let kept = match bare.as_str() {
                "like" | "likes" if !LIKERS.contains(&previous.as_str()) => None,
                "no" if next_is_word && word.len() == 2 => Some("not"),
                _ => Some(word),
            };
            if let Some(kept) = kept {
                if !first {
                    out.push(' ');
                }
                first = false;
                out.push_str(kept);
            }
            previous = bare;
        }
    }
    for advance in ["thanks in advance", "thank you in advance", "Thanks in advance", "Thank you in advance"] {
        out = out.replace(advance, "");
    }
    out.replace('🔥', " awesome ")
}

/// Sentiment that agrees with the intent: a complaint scores at most
/// -[`INTENT_FLOOR`] and praise at least [`INTENT_FLOOR`], unless VADER's
/// score disagrees strongly (beyond ±[`STRONG_SENTIMENT`]), when it stands.
/// Problem reports are often written in words VADER does not score ("the
/// export isn't working", "still happening"), and so is short praise ("acme
/// support rocks", "exactly what I needed, +1").
fn agreeing(score: f64, intent: Intent) -> f64 {
    match intent {
        Intent::Complaint if score > -INTENT_FLOOR && score < STRONG_SENTIMENT => -INTENT_FLOOR,
        Intent::Praise if score < INTENT_FLOOR && score > -STRONG_SENTIMENT => INTENT_FLOOR,
        _ => score,
    }
}

/// The text without fenced or inline code, URLs and @mentions. Markdown
/// links keep their text.
fn prose(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_fence = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            out.push('\n');
            continue;
        }
        if in_fence {
            continue;
        }
        let mut in_code = false;
        let mut kept = String::with_capacity(line.len());
        for part in line.split('`') {
            if !in_code {
                kept.push_str(part);
            } else if !part.is_empty() {
                // A placeholder keeps "`foo` is the exception" from reading
                // as a question opening with "is the".
                kept.push_str("code");
            }
            in_code = !in_code;
        }
        let mut first = true;
        for word in kept.split(' ') {
            let word = match word.find("](") {
                Some(end) => &word[..end],
                None => word,
            };
            let bare = word.trim_start_matches(['(', '[', '<', '"']);
            let is_url = ["http://", "https://", "www."].iter().any(|p| bare.starts_with(p));
            let is_mention = bare.starts_with('@') && bare.chars().nth(1).is_some_and(char::is_alphanumeric);
            if is_url || is_mention {
                continue;
            }
            if !first {
                out.push(' ');
            }
            out.push_str(word.trim_start_matches('['));
            first = false;
        }
        out.push('\n');
    }
    out.trim().to_owned()
}

/// Lower case, typographic apostrophes straightened and common contractions
/// typed without one ("dont") restored.
fn normalize(prose: &str) -> String {
    #[rustfmt::skip]
    const CONTRACTIONS: &[(&str, &str)] = &[
        ("dont", "don't"), ("doesnt", "doesn't"), ("didnt", "didn't"), ("cant", "can't"), ("isnt", "isn't"),
        ("wasnt", "wasn't"), ("arent", "aren't"), ("wont", "won't"), ("wouldnt", "wouldn't"), ("couldnt", "couldn't"),
        ("shouldnt", "shouldn't"), ("havent", "haven't"), ("hasnt", "hasn't"), ("thats", "that's"),
        ("whats", "what's"), ("ive", "i've"),
    ];
    let lower = prose.to_lowercase();
    let mut out = String::with_capacity(lower.len() + 8);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        match CONTRACTIONS.iter().find(|(typed, _)| *typed == word.as_str()) {
            Some((_, fixed)) => out.push_str(fixed),
            None => out.push_str(word),
        }
        word.clear();
    };
    for c in lower.chars() {
        let c = match c {
            '’' | '‘' | '`' => '\'',
            '“' | '”' => '"',
            c => c,
        };
        if c.is_alphanumeric() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sentiment a check expects.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Tone {
        Positive,
        Negative,
        Neutral,
        /// Not scored: `sentiment_skipped` says why.
        Skipped,
        Any,
    }

    fn tone(signals: &Signals) -> Tone {
        match signals.sentiment {
            _ if signals.sentiment_skipped.is_some() => Tone::Skipped,
            s if s > 0.05 => Tone::Positive,
            s if s < -0.05 => Tone::Negative,
            _ => Tone::Neutral,
        }
    }

    fn contribution(kind: Kind, title: Option<&str>, body: &str) -> Contribution {
        Contribution {
            kind,
            title: title.map(str::to_owned),
            body: body.to_owned(),
            language: None,
            signals: None,
            ..tributary_demo::DemoSource::new("test", Default::default()).contribution(0)
        }
    }

    /// Enriches `body` as a contribution of `kind` and checks its intent and
    /// the sign of its sentiment.
    fn check(kind: Kind, body: &str, intent: Intent, expected: Tone) {
        let mut c = contribution(kind, None, body);
        enrich(&mut c);
        let signals = c.signals.clone().unwrap();
        let why =
            format!("{body:?} as {kind:?}: {signals:?}, language {:?}, {:?}", c.language, Cues::find(&prose(body)));
        assert_eq!(signals.intent, intent, "intent of {why}");
        if expected != Tone::Any {
            assert_eq!(tone(&signals), expected, "sentiment of {why}");
        }
    }

    #[test]
    fn intents_follow_the_rule_set() {
        for (text, intent) in [
            ("How do I export my dashboards to PDF", Intent::Question),
            ("The app crashes, any idea why?", Intent::Question),
            ("Feature request: dark mode for the editor", Intent::Idea),
            ("It would be great to have webhooks", Intent::Idea),
            ("Could you add a way to pin comments? Scrolling gets old.", Intent::Idea),
            ("The sync is broken again and we lost a day", Intent::Complaint),
            ("I was charged twice, this is terrible", Intent::Complaint),
            ("Love the new editor, great job team", Intent::Praise),
            ("We're hosting a meetup in Berlin next month", Intent::Other),
        ] {
            check(Kind::Post, text, intent, Tone::Any);
        }
    }

    #[test]
    fn negation_does_not_flip_the_wrong_way() {
        for (text, intent, tone) in [
            ("Not broken anymore, thanks!", Intent::Praise, Tone::Positive),
            ("I don't love this.", Intent::Complaint, Tone::Negative),
            ("The new timeline is not great, half the cards are cut off.", Intent::Complaint, Tone::Negative),
            ("The calendar doesn't work well with recurring events.", Intent::Complaint, Tone::Negative),
            ("Two years in and never had a problem with the sync.", Intent::Praise, Tone::Positive),
            ("No complaints, the team picked it up in a day.", Intent::Praise, Tone::Positive),
            ("Couldn't be happier with the move from spreadsheets.", Intent::Praise, Tone::Positive),
            ("Can't recommend the API docs enough.", Intent::Praise, Tone::Positive),
            ("Nothing but good things to say about onboarding", Intent::Praise, Tone::Positive),
            ("Honestly not impressed by the new reports.", Intent::Complaint, Tone::Negative),
            ("No problem, I'll send the logs on Monday.", Intent::Other, Tone::Any),
        ] {
            check(Kind::Post, text, intent, tone);
        }
    }

    #[test]
    fn sarcasm_is_a_complaint_with_negative_sentiment() {
        for text in [
            "great, another outage",
            "oh wonderful, it crashed again",
            "thanks for nothing",
            "the new editor is so intuitive /s",
            "yeah right, fixed in the next release",
            "Love how the export button moved again.",
            "The sync died in the middle of our demo. Great job.",
            "Just what we needed: a login page that times out 🙃",
            "Danke für nichts, der Export ist wieder leer und niemand antwortet.",
        ] {
            let mut c = contribution(Kind::Post, None, text);
            enrich(&mut c);
            let signals = c.signals.unwrap();
            assert_eq!(signals.intent, Intent::Complaint, "{text:?}: {signals:?}");
            if signals.sentiment_skipped.is_none() {
                assert!(signals.sentiment <= -INTENT_FLOOR, "{text:?}: {signals:?}");
            }
        }
        // Praise that closes a problem is no sarcasm.
        check(Kind::Post, "Great, thanks! That fixed the crash.", Intent::Praise, Tone::Positive);
        check(Kind::Post, "Great tutorial, how do I get the sidebar to collapse?", Intent::Question, Tone::Any);
    }

    #[test]
    fn questions_without_question_marks() {
        for text in [
            "any way to export to PDF",
            "wondering if the API can send webhooks for comments",
            "is it possible to change the billing email",
            "how do I add a guest to one board",
            "anyone know a good template for sprint planning",
            "looking for a way to bulk invite 200 users",
            "help with recurring tasks on the 2nd tuesday",
            "can't figure out how to start the week on Monday",
            "when is the Android widget coming back",
            "How do I fix this crash?",
        ] {
            check(Kind::Post, text, Intent::Question, Tone::Any);
        }
        // Exclamations and headlines are no questions.
        check(Kind::Post, "how great is this!", Intent::Praise, Tone::Positive);
        check(Kind::Post, "What a release. Well done, team", Intent::Praise, Tone::Positive);
        check(Kind::Post, "How to set up SSO in five minutes\nA step by step guide.", Intent::Other, Tone::Any);
        // Rhetorical, angry questions are complaints.
        for text in [
            "why is this still broken?",
            "How hard can it be to keep me logged in??",
            "Is the export failing again for anyone else?",
            "Seriously, who decided to hide the export button?",
        ] {
            check(Kind::Post, text, Intent::Complaint, Tone::Negative);
        }
    }

    #[test]
    fn support_ticket_phrasing() {
        for (kind, text, intent, tone) in [
            (Kind::Ticket, "I am unable to log in since this morning.", Intent::Complaint, Tone::Negative),
            (Kind::Ticket, "We are getting error 500 on every export.", Intent::Complaint, Tone::Negative),
            (Kind::Ticket, "The invoice shows the wrong amount, please advise.", Intent::Complaint, Tone::Negative),
            (Kind::Ticket, "Our users are not receiving emails since Friday", Intent::Complaint, Tone::Negative),
            (Kind::Ticket, "Issue with SSO for our second domain", Intent::Complaint, Tone::Negative),
            (Kind::Ticket, "Please advise how to add a second admin.", Intent::Question, Tone::Neutral),
            (Kind::Ticket, "Request: cancel my subscription at the end of the month.", Intent::Question, Tone::Any),
            (Kind::Ticket, "Kindly help us set up the Slack integration.", Intent::Question, Tone::Neutral),
            (Kind::Ticket, "We need the invoices in EUR from next month on.", Intent::Question, Tone::Neutral),
            (Kind::TicketComment, "Thank you, that fixed it!", Intent::Praise, Tone::Positive),
            (Kind::TicketComment, "Still happening after clearing the cache.", Intent::Complaint, Tone::Negative),
            (Kind::TicketComment, "Attached the logs you asked for.", Intent::Other, Tone::Neutral),
            // Outside a ticket, a plain statement of need is no question.
            (Kind::Post, "We need the invoices in EUR from next month on.", Intent::Other, Tone::Neutral),
        ] {
            check(kind, text, intent, tone);
        }
    }

    #[test]
    fn non_english_sentiment_is_skipped_and_intent_still_works() {
        let mut c = contribution(
            Kind::Ticket,
            None,
            "Der Export funktioniert nicht mehr seit dem letzten Update, wir bekommen nur eine leere Datei.",
        );
        enrich(&mut c);
        let signals = c.signals.unwrap();
        assert_eq!(c.language.as_deref(), Some("deu"));
        assert_eq!(signals.sentiment, 0.0);
        assert_eq!(signals.sentiment_skipped.as_deref(), Some("sentiment is scored in English only; this text is deu"));
        assert_eq!(signals.intent, Intent::Complaint);
        for (text, intent) in [
            (
                "Bonjour, comment puis-je ajouter un deuxième administrateur à notre espace de travail ?",
                Intent::Question,
            ),
            ("¿Es posible tener dos espacios de trabajo distintos con la misma cuenta de correo?", Intent::Question),
            ("Sería genial que la aplicación móvil tuviera un modo sin conexión para el metro.", Intent::Idea),
            ("Muito obrigado pela ajuda de hoje, a sincronização foi resolvida rapidamente.", Intent::Praise),
            ("Da quando avete cambiato l'interfaccia la ricerca non funziona più per nessuno.", Intent::Complaint),
            ("Het zou fijn zijn als we de kleuren van de labels zelf konden kiezen.", Intent::Idea),
            ("Bedankt voor de snelle hulp gisteren, alles werkt weer zoals het hoort.", Intent::Praise),
        ] {
            check(Kind::Post, text, intent, Tone::Skipped);
        }
        // English is scored, short text without a reliable detection too,
        // and a language the connector set is kept.
        let mut english =
            contribution(Kind::Post, None, "The export has been failing since Monday and payroll is due.");
        enrich(&mut english);
        assert_eq!(english.language.as_deref(), Some("eng"));
        assert_eq!(english.signals.as_ref().and_then(|s| s.sentiment_skipped.clone()), None);
        check(Kind::Post, "Muchas gracias!!", Intent::Praise, Tone::Positive);
        let mut preset = Contribution { language: Some("fra".into()), ..contribution(Kind::Post, None, "Super !") };
        enrich(&mut preset);
        assert_eq!(preset.signals.map(|s| (s.sentiment, s.sentiment_skipped.is_some())), Some((0.0, true)));
    }

    #[test]
    fn thread_titles_code_and_urls_do_not_decide() {
        // A reply carries its thread's title; the reply is an answer.
        let mut reply = contribution(Kind::Reply, Some("How do I export to PDF?"), "It's under Settings, Export.");
        enrich(&mut reply);
        assert_eq!(reply.signals.map(|s| s.intent), Some(Intent::Other));
        let mut post = contribution(Kind::Post, Some("How do I export to PDF?"), "I looked in settings.");
        enrich(&mut post);
        assert_eq!(post.signals.map(|s| s.intent), Some(Intent::Question));
        check(
            Kind::Post,
            concat!(
                "We call `client.export(id).await?` for each board, see https://example.com/docs?page=2 for the loop.",
                "\n```\nlet rows = export(id)?;\n```",
            ),
            Intent::Other,
            Tone::Neutral,
        );
    }

    #[test]
    fn enrichment_sets_language_sentiment_and_intent() {
        let mut c = tributary_demo::DemoSource::new("demo", Default::default()).contribution(0);
        c.kind = Kind::Post;
        c.title = Some("  Love it  ".into());
        c.body = "This is fantastic, thank you so much for the great work on the new release!\n\n\n".into();
        enrich(&mut c);
        let signals = c.signals.clone().unwrap();
        assert_eq!(signals.intent, Intent::Praise);
        assert!(signals.sentiment > 0.5, "{signals:?}");
        assert_eq!(c.language.as_deref(), Some("eng"));
        assert_eq!(c.title.as_deref(), Some("Love it"));
        assert!(!c.body.ends_with('\n'));

        let mut angry = c.clone();
        angry.title = None;
        angry.language = None;
        angry.body = "Terrible. The worst update ever, everything is broken and I hate it.".into();
        enrich(&mut angry);
        let signals = angry.signals.unwrap();
        assert_eq!(signals.intent, Intent::Complaint);
        assert!(signals.sentiment < -0.5, "{signals:?}");
    }

    /// Per-class precision and recall on `tests/data/signals.jsonl` (see
    /// `cargo bench --bench signals` for the full report) stay above floors
    /// a little below what the rule set achieves, and every item labelled
    /// with another language than English has its sentiment skipped.
    #[test]
    fn the_labelled_set_holds_its_floor() {
        const CLASSES: [Intent; 5] = [Intent::Question, Intent::Complaint, Intent::Idea, Intent::Praise, Intent::Other];
        // (precision, recall) floors per class, in the order of CLASSES.
        // Achieved when set: question 0.914/0.969, complaint 0.933/0.907,
        // idea 0.972/0.909, praise 0.900/0.956, other 0.853/0.810; accuracy
        // 0.914; sentiment 0.758.
        const FLOORS: [(f64, f64); 5] = [(0.86, 0.92), (0.88, 0.85), (0.92, 0.85), (0.85, 0.90), (0.80, 0.75)];
        const ACCURACY_FLOOR: f64 = 0.88;
        const SENTIMENT_FLOOR: f64 = 0.72;

        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/signals.jsonl");
        let text = std::fs::read_to_string(path).unwrap();
        let template = tributary_demo::DemoSource::new("eval", Default::default()).contribution(0);
        let mut matrix = [[0usize; 5]; 5];
        let (mut scored, mut sentiment_hits, mut english_skipped) = (0, 0, 0);
        let mut not_skipped = vec![];
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let item: serde_json::Value = serde_json::from_str(line).unwrap();
            let field = |name: &str| item[name].as_str().map(str::to_owned);
            let mut c = Contribution {
                platform: field("platform").unwrap(),
                kind: serde_json::from_value(item["kind"].clone()).unwrap(),
                title: field("title"),
                body: field("body").unwrap(),
                language: None,
                signals: None,
                ..template.clone()
            };
            enrich(&mut c);
            let signals = c.signals.unwrap();
            let label: Intent = serde_json::from_value(item["intent"].clone()).unwrap();
            let at = |intent| CLASSES.iter().position(|c| *c == intent).unwrap();
            matrix[at(label)][at(signals.intent)] += 1;
            match field("language") {
                Some(_) if signals.sentiment_skipped.is_none() => not_skipped.push(line.to_owned()),
                Some(_) => {}
                None if signals.sentiment_skipped.is_some() => english_skipped += 1,
                None => {
                    scored += 1;
                    let got = tone(&signals);
                    let want = match field("sentiment").as_deref() {
                        Some("positive") => Tone::Positive,
                        Some("negative") => Tone::Negative,
                        _ => Tone::Neutral,
                    };
                    sentiment_hits += usize::from(got == want);
                }
            }
        }
        assert!(not_skipped.is_empty(), "non-English items scored: {not_skipped:#?}");
        assert!(english_skipped <= 2, "{english_skipped} English items not scored");
        let total: usize = matrix.iter().flatten().sum();
        assert!(total >= 320, "{total} items");
        let mut report = String::new();
        let mut failures = vec![];
        for (i, class) in CLASSES.iter().enumerate() {
            let predicted: usize = (0..5).map(|row| matrix[row][i]).sum();
            let support: usize = matrix[i].iter().sum();
            let precision = matrix[i][i] as f64 / predicted.max(1) as f64;
            let recall = matrix[i][i] as f64 / support.max(1) as f64;
            report += &format!("{}: precision {precision:.3} recall {recall:.3}\n", class.as_str());
            let (precision_floor, recall_floor) = FLOORS[i];
            if precision < precision_floor || recall < recall_floor {
                failures.push(class.as_str());
            }
        }
        let accuracy = (0..5).map(|i| matrix[i][i]).sum::<usize>() as f64 / total as f64;
        let sentiment_accuracy = sentiment_hits as f64 / scored as f64;
        report += &format!("accuracy {accuracy:.3}, sentiment accuracy {sentiment_accuracy:.3}\n");
        assert!(failures.is_empty(), "below the floor: {failures:?}\n{report}{matrix:?}");
        assert!(accuracy >= ACCURACY_FLOOR, "{report}");
        assert!(sentiment_accuracy >= SENTIMENT_FLOOR, "{report}");
    }
}
