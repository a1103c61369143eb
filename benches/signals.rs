//! Signals quality and speed: runs `tributary::enrich::enrich` over the
//! labelled evaluation set in `tests/data/signals.jsonl` and prints the
//! intent confusion matrix, per-class precision/recall/F1, accuracy and
//! macro F1, sentiment accuracy (positive > 0.05, negative < -0.05, else
//! neutral; over the items whose sentiment was scored), language skipping,
//! accuracy per tag and throughput.
//!
//! Besides the fields every item has, an item may carry `language` (ISO
//! 639-3, for text that is not English: its sentiment must be skipped) and
//! `tags`: `sarcasm`, `negation`, `rhetorical`, `no_qmark`,
//! `ticket_phrasing`, `fixture` (text quoted from the recorded platform
//! responses in the shared fixtures), `hard` (a human hesitates too), and
//! `holdout`, `holdout2`, `holdout3`: items written after the rules, to see
//! how they hold up on text they were not tuned on (each batch was run once
//! before any rule changed because of it). The language given in the set is
//! never passed to `enrich`: detection is measured too.
//!
//!     cargo bench --bench signals
//!     SIGNALS_MISSES=1 cargo bench --bench signals    # also list every miss
//!     SIGNALS_REPS=50 cargo bench --bench signals     # repetitions timed
//!     SIGNALS_FILE=other.jsonl cargo bench --bench signals  # another labelled set

use std::{collections::BTreeMap, time::Instant};

use serde::Deserialize;
use tributary::enrich::enrich;
use tributary_demo::DemoSource;
use tributary_sdk::{Contribution, Intent, Kind};

const CLASSES: [Intent; 5] = [Intent::Question, Intent::Complaint, Intent::Idea, Intent::Praise, Intent::Other];

#[derive(Debug, Deserialize)]
struct Item {
    platform: String,
    kind: Kind,
    title: Option<String>,
    body: String,
    intent: Intent,
    sentiment: String,
    language: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

fn index(intent: Intent) -> usize {
    CLASSES.iter().position(|c| *c == intent).unwrap()
}

fn polarity(score: f64) -> &'static str {
    if score > 0.05 {
        "positive"
    } else if score < -0.05 {
        "negative"
    } else {
        "neutral"
    }
}

fn contribution(template: &Contribution, item: &Item) -> Contribution {
    Contribution {
        platform: item.platform.clone(),
        kind: item.kind,
        title: item.title.clone(),
        body: item.body.clone(),
        language: None,
        signals: None,
        ..template.clone()
    }
}

fn main() {
    let path = std::env::var("SIGNALS_FILE")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/signals.jsonl").to_owned());
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let items: Vec<Item> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {}: {e}", n + 1)))
        .collect();
    let template = DemoSource::new("eval", Default::default()).contribution(0);
    let show_misses = std::env::var_os("SIGNALS_MISSES").is_some();

    print_counts(&items);

    // Quality.
    let mut matrix = [[0usize; 5]; 5];
    let mut sentiment_hits = 0usize;
    let mut sentiment_scored = 0usize;
    let mut sentiment_matrix: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let (mut skipped, mut foreign, mut foreign_skipped, mut english_skipped) = (0usize, 0usize, 0usize, 0usize);
    let mut wrong_language: Vec<String> = vec![];
    let mut by_tag: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut misses = vec![];
    for item in &items {
        let mut c = contribution(&template, item);
        enrich(&mut c);
        let signals = c.signals.clone().unwrap();
        let ok = signals.intent == item.intent;
        matrix[index(item.intent)][index(signals.intent)] += 1;
        let no_qmark_question = item.intent == Intent::Question
            && !format!("{}{}", item.title.as_deref().unwrap_or(""), item.body).contains(['?', '¿']);
        let mut tags = item.tags.clone();
        if item.language.is_some() {
            tags.push("non_english".into());
        }
        if no_qmark_question {
            tags.push("question_without_?".into());
        }
        tags.push(format!("kind:{}", item.kind.as_str()));
        for tag in tags {
            let entry = by_tag.entry(tag).or_default();
            entry.0 += usize::from(ok);
            entry.1 += 1;
        }
        if signals.sentiment_skipped.is_some() {
            skipped += 1;
        }
        match &item.language {
            Some(lang) => {
                foreign += 1;
                if signals.sentiment_skipped.is_some() {
                    foreign_skipped += 1;
                } else {
                    wrong_language.push(format!("not skipped ({lang}, detected {:?}): {}", c.language, item.body));
                }
            }
            None => {
                if signals.sentiment_skipped.is_some() {
                    english_skipped += 1;
                    wrong_language.push(format!("English skipped (detected {:?}): {}", c.language, item.body));
                }
            }
        }
        if signals.sentiment_skipped.is_none() {
            sentiment_scored += 1;
            let got = polarity(signals.sentiment);
            sentiment_hits += usize::from(got == item.sentiment);
            *sentiment_matrix.entry((item.sentiment.as_str(), got)).or_default() += 1;
            if show_misses && got != item.sentiment {
                misses.push(format!(
                    "  sentiment {:>8} got {:>8} ({:+.3}): {}",
                    item.sentiment,
                    got,
                    signals.sentiment,
                    one_line(item)
                ));
            }
        }
        if show_misses && !ok {
            misses.push(format!(
                "  intent {:>9} got {:>9} ({:+.3}) [{}] {}",
                item.intent.as_str(),
                signals.intent.as_str(),
                signals.sentiment,
                item.tags.join(","),
                one_line(item)
            ));
        }
    }

    println!("\nIntent confusion matrix (rows: label, columns: predicted)");
    print!("{:>10}", "");
    for class in CLASSES {
        print!("{:>10}", class.as_str());
    }
    println!();
    for (row, class) in CLASSES.iter().enumerate() {
        print!("{:>10}", class.as_str());
        for count in matrix[row] {
            print!("{count:>10}");
        }
        println!();
    }

    println!("\n{:>10} {:>9} {:>9} {:>9} {:>9}", "class", "precision", "recall", "f1", "support");
    let mut f1_sum = 0.0;
    for (i, class) in CLASSES.iter().enumerate() {
        let tp = matrix[i][i] as f64;
        let predicted: usize = (0..5).map(|r| matrix[r][i]).sum();
        let support: usize = matrix[i].iter().sum();
        let precision = if predicted == 0 { 0.0 } else { tp / predicted as f64 };
        let recall = if support == 0 { 0.0 } else { tp / support as f64 };
        let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
        f1_sum += f1;
        println!("{:>10} {precision:>9.3} {recall:>9.3} {f1:>9.3} {support:>9}", class.as_str());
    }
    let correct: usize = (0..5).map(|i| matrix[i][i]).sum();
    println!("\nintent accuracy: {:.3} ({correct}/{})", correct as f64 / items.len() as f64, items.len());
    println!("intent macro F1: {:.3}", f1_sum / 5.0);

    println!("\nIntent accuracy by tag");
    for (tag, (hits, total)) in &by_tag {
        println!("{tag:>24} {:>6.3} ({hits}/{total})", *hits as f64 / *total as f64);
    }

    println!(
        "\nsentiment accuracy (scored items): {:.3} ({sentiment_hits}/{sentiment_scored})",
        sentiment_hits as f64 / sentiment_scored.max(1) as f64
    );
    println!("{:>10} {:>9} {:>9} {:>9}   (rows: label, columns: predicted)", "", "positive", "negative", "neutral");
    for label in ["positive", "negative", "neutral"] {
        print!("{label:>10}");
        for got in ["positive", "negative", "neutral"] {
            print!(" {:>9}", sentiment_matrix.get(&(label, got)).copied().unwrap_or(0));
        }
        println!();
    }

    println!("\nsentiment skipped for language: {skipped} of {} items", items.len());
    println!(
        "non-English items skipped: {foreign_skipped}/{foreign} ({}); English items skipped: {english_skipped}",
        if foreign_skipped == foreign { "all" } else { "NOT all" }
    );
    for line in &wrong_language {
        println!("  {line}");
    }
    if show_misses {
        println!("\nMisses");
        for line in &misses {
            println!("{line}");
        }
    }

    // Speed: contributions built beforehand, only `enrich` is timed.
    let reps: usize = std::env::var("SIGNALS_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let mut batch: Vec<Contribution> =
        (0..reps).flat_map(|_| items.iter().map(|item| contribution(&template, item))).collect();
    let started = Instant::now();
    for c in &mut batch {
        enrich(c);
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "\nthroughput: {:.0} contributions/s ({} enrichments in {:.3} s, {reps} repetitions of {} items)",
        batch.len() as f64 / secs,
        batch.len(),
        secs,
        items.len()
    );
}

fn one_line(item: &Item) -> String {
    let text = match &item.title {
        Some(title) => format!("{title} | {}", item.body),
        None => item.body.clone(),
    };
    let text = text.replace('\n', " ⏎ ");
    let short: String = text.chars().take(150).collect();
    format!("[{} {}] {short}", item.platform, item.kind.as_str())
}

fn print_counts(items: &[Item]) {
    let mut by_intent: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_platform: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_language: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_sentiment: BTreeMap<&str, usize> = BTreeMap::new();
    for item in items {
        *by_intent.entry(item.intent.as_str()).or_default() += 1;
        *by_platform.entry(&item.platform).or_default() += 1;
        *by_language.entry(item.language.as_deref().unwrap_or("eng")).or_default() += 1;
        *by_sentiment.entry(&item.sentiment).or_default() += 1;
    }
    let join = |m: &BTreeMap<&str, usize>| m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
    println!("Evaluation set: {} items", items.len());
    println!("  intent:    {}", join(&by_intent));
    println!("  sentiment: {}", join(&by_sentiment));
    println!("  platform:  {}", join(&by_platform));
    println!("  language:  {}", join(&by_language));
}
