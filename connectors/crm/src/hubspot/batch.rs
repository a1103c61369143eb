//! HubSpot's batch endpoints, record by record.
//!
//! A batch call can answer 200 (all done), 207 (some results, some
//! `errors[]`) or a 400 for the whole batch when one record is invalid. The
//! code here turns every answer into one outcome per input: results are
//! matched to inputs by `objectWriteTraceId`, by the `idProperty` value or
//! object id, and only then by position; errors by the ids their `context`
//! names; and a rejected batch is split in halves until the bad records are
//! alone, so the rest lands and only they are refused, with HubSpot's own
//! message.

use std::collections::VecDeque;

use serde::Deserialize;
use serde_json::{Value, json};
use tributary_sdk::CrmError;

use super::{ErrorBody, HubSpotCrm};

/// HubSpot's limit of inputs per batch call.
pub(crate) const BATCH_LIMIT: usize = 100;

/// One input of a batch call and how HubSpot's answer names it.
#[derive(Debug, Clone)]
pub(crate) struct BatchInput {
    /// The JSON of one element of `inputs`.
    pub body: Value,
    pub names: Names,
}

#[derive(Debug, Clone)]
pub(crate) enum Names {
    /// An upsert by `idProperty`; `trace` is its `objectWriteTraceId`.
    Unique { property: String, value: String, trace: String },
    /// An update by object id.
    Id { id: String, trace: String },
    /// An association from one object to another.
    Pair { from: String, to: String },
}

impl Names {
    /// Whether a result object of HubSpot's answer is this input's.
    fn is_result(&self, result: &Value) -> bool {
        let trace_of = |result: &Value| result.get("objectWriteTraceId").and_then(Value::as_str).map(str::to_owned);
        match self {
            Names::Unique { property, value, trace } => {
                trace_of(result).as_deref() == Some(trace.as_str())
                    || result
                        .get("properties")
                        .and_then(|properties| properties.get(property))
                        .and_then(Value::as_str)
                        .is_some_and(|found| same_value(property, found, value))
            }
            Names::Id { id, trace } => {
                trace_of(result).as_deref() == Some(trace.as_str())
                    || result.get("id").and_then(Value::as_str) == Some(id.as_str())
            }
            Names::Pair { from, to } => {
                let id = |side: &str| result.get(side).and_then(|o| o.get("id")).and_then(id_text);
                id("from").as_deref() == Some(from.as_str()) && id("to").as_deref() == Some(to.as_str())
            }
        }
    }

    /// Whether an error's context names this input.
    fn is_named_by(&self, named: &[String]) -> bool {
        let any = |wanted: &str, property: &str| named.iter().any(|n| same_value(property, n, wanted));
        match self {
            Names::Unique { property, value, trace } => any(trace, "") || any(value, property),
            Names::Id { id, trace } => any(trace, "") || any(id, ""),
            Names::Pair { from, to } => any(from, "") || any(to, ""),
        }
    }
}

/// HubSpot keeps e-mail addresses in lowercase and matches them so.
fn same_value(property: &str, a: &str, b: &str) -> bool {
    if property == "email" { a.eq_ignore_ascii_case(b) } else { a == b }
}

/// Ids come as strings in v3 and sometimes as numbers in v4.
fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// What became of one input.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Written {
    /// The result object HubSpot returned for it.
    Done(Value),
    /// HubSpot's message.
    Rejected(String),
}

#[derive(Debug, Default, Deserialize)]
struct BatchAnswer {
    #[serde(default)]
    results: Vec<Value>,
    #[serde(default)]
    errors: Vec<BatchError>,
}

#[derive(Debug, Default, Deserialize)]
struct BatchError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    category: String,
    #[serde(default)]
    context: Value,
    #[serde(default)]
    errors: Vec<Value>,
}

impl BatchError {
    /// Every string in the error's context (and its details' contexts).
    fn named(&self) -> Vec<String> {
        let mut named = Vec::new();
        collect_strings(&self.context, &mut named);
        for detail in &self.errors {
            if let Some(context) = detail.get("context") {
                collect_strings(context, &mut named);
            }
        }
        named
    }

    fn describe(&self) -> String {
        match (self.message.is_empty(), self.category.is_empty()) {
            (false, _) => self.message.clone(),
            (true, false) => self.category.clone(),
            (true, true) => "HubSpot refused this record without a message".into(),
        }
    }
}

fn collect_strings(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::String(text) => into.push(text.clone()),
        Value::Number(number) => into.push(number.to_string()),
        Value::Array(items) => items.iter().for_each(|item| collect_strings(item, into)),
        Value::Object(fields) => fields.values().for_each(|field| collect_strings(field, into)),
        _ => {}
    }
}

/// Maps a 200/207 answer onto `inputs`.
fn map_answer(status: u16, answer: BatchAnswer, inputs: &[BatchInput]) -> Vec<Written> {
    let mut outcomes: Vec<Option<Written>> = vec![None; inputs.len()];
    let mut claimed = vec![false; answer.results.len()];
    for (input, outcome) in inputs.iter().zip(outcomes.iter_mut()) {
        let found =
            answer.results.iter().enumerate().find(|(index, result)| !claimed[*index] && input.names.is_result(result));
        if let Some((index, result)) = found {
            claimed[index] = true;
            *outcome = Some(Written::Done(result.clone()));
        }
    }
    // Results that name nothing we can match, and as many of them as
    // unmatched inputs, with no errors: HubSpot answered in input order.
    let unmatched: Vec<usize> = (0..inputs.len()).filter(|i| outcomes[*i].is_none()).collect();
    let unclaimed: Vec<usize> = (0..claimed.len()).filter(|i| !claimed[*i]).collect();
    if answer.errors.is_empty() && !unmatched.is_empty() && unmatched.len() == unclaimed.len() {
        for (input, result) in unmatched.iter().zip(&unclaimed) {
            outcomes[*input] = Some(Written::Done(answer.results[*result].clone()));
        }
    }
    let mut unmapped_errors = Vec::new();
    for error in &answer.errors {
        let named = error.named();
        let mut mapped = false;
        for (input, outcome) in inputs.iter().zip(outcomes.iter_mut()) {
            if outcome.is_none() && input.names.is_named_by(&named) {
                *outcome = Some(Written::Rejected(error.describe()));
                mapped = true;
            }
        }
        if !mapped {
            unmapped_errors.push(error.describe());
        }
    }
    let leftover = if unmapped_errors.is_empty() {
        format!("HubSpot answered HTTP {status} without a result or an error for this record")
    } else {
        unmapped_errors.join("; ")
    };
    outcomes.into_iter().map(|outcome| outcome.unwrap_or_else(|| Written::Rejected(leftover.clone()))).collect()
}

impl HubSpotCrm {
    /// Sends `inputs` to a batch endpoint in calls of at most 100 and
    /// returns one outcome per input, in input order.
    pub(crate) async fn write_batch(&self, path: &str, inputs: &[BatchInput]) -> Result<Vec<Written>, CrmError> {
        let mut outcomes: Vec<Option<Written>> = vec![None; inputs.len()];
        let mut pending: VecDeque<(usize, usize)> = (0..inputs.len())
            .step_by(BATCH_LIMIT)
            .map(|start| (start, (start + BATCH_LIMIT).min(inputs.len())))
            .collect();
        while let Some((start, end)) = pending.pop_front() {
            let slice = &inputs[start..end];
            let body = json!({ "inputs": slice.iter().map(|input| &input.body).collect::<Vec<_>>() });
            let response = self.call(reqwest::Method::POST, path, Some(&body)).await?;
            match response.status.as_u16() {
                status @ (200 | 201 | 207) => {
                    let answer: BatchAnswer =
                        response.json().map_err(|error| CrmError::Decode(self.scrub(&error.to_string())))?;
                    for (offset, written) in map_answer(status, answer, slice).into_iter().enumerate() {
                        outcomes[start + offset] = Some(written);
                    }
                }
                400 | 409 => {
                    let error = ErrorBody::parse(&response);
                    if error.names_missing_property() {
                        return Err(CrmError::Transient(self.scrub(&format!(
                            "HubSpot does not know a property Tributary writes; run `tributary crm setup` \
                             (with every platform configured): {}",
                            error.describe(&response)
                        ))));
                    }
                    if slice.len() > 1 {
                        // Isolate the bad record(s): the halves are retried
                        // on their own, ahead of the other chunks.
                        let middle = start + slice.len() / 2;
                        pending.push_front((middle, end));
                        pending.push_front((start, middle));
                        tracing::debug!(
                            path,
                            records = slice.len(),
                            "hubspot refused a batch; splitting it to isolate the bad record"
                        );
                    } else {
                        let message = self.scrub(&error.describe(&response));
                        tracing::debug!(path, %message, "hubspot refused a record");
                        outcomes[start] = Some(Written::Rejected(message));
                    }
                }
                _ => return Err(self.unexpected(&response)),
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or_else(|| Written::Rejected("not sent".into())))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unique(value: &str, trace: &str) -> BatchInput {
        BatchInput {
            body: json!({}),
            names: Names::Unique { property: "email".into(), value: value.into(), trace: trace.into() },
        }
    }

    fn check(inputs: &[BatchInput], answer: Value, expected: &[Result<&str, &str>]) {
        let answer: BatchAnswer = serde_json::from_value(answer).unwrap();
        let outcomes = map_answer(207, answer, inputs);
        let outcomes: Vec<Result<String, String>> = outcomes
            .into_iter()
            .map(|written| match written {
                Written::Done(result) => Ok(result["id"].as_str().unwrap_or("?").to_owned()),
                Written::Rejected(message) => Err(message),
            })
            .collect();
        let expected: Vec<Result<String, String>> =
            expected.iter().map(|e| e.map(str::to_owned).map_err(str::to_owned)).collect();
        assert_eq!(outcomes, expected);
    }

    #[test]
    fn answers_map_onto_inputs() {
        let inputs = [unique("a@x.io", "t0"), unique("B@x.io", "t1"), unique("c@x.io", "t2")];
        // By trace id, whatever the order.
        check(
            &inputs,
            json!({"results": [{"id": "3", "objectWriteTraceId": "t2"}, {"id": "1", "objectWriteTraceId": "t0"}, {"id": "2", "objectWriteTraceId": "t1"}]}),
            &[Ok("1"), Ok("2"), Ok("3")],
        );
        // By the idProperty value (e-mail case-insensitively).
        check(
            &inputs,
            json!({"results": [{"id": "2", "properties": {"email": "b@x.io"}}, {"id": "1", "properties": {"email": "a@x.io"}}, {"id": "3", "properties": {"email": "c@x.io"}}]}),
            &[Ok("1"), Ok("2"), Ok("3")],
        );
        // By position when nothing names the inputs.
        check(&inputs, json!({"results": [{"id": "1"}, {"id": "2"}, {"id": "3"}]}), &[Ok("1"), Ok("2"), Ok("3")]);
        // Errors by their context; others by elimination.
        check(
            &inputs,
            json!({"results": [{"id": "1", "properties": {"email": "a@x.io"}}],
                   "errors": [{"message": "bad c", "context": {"ids": ["c@x.io"]}}, {"message": "something else"}]}),
            &[Ok("1"), Err("something else"), Err("bad c")],
        );
    }

    #[test]
    fn ids_and_pairs_match_results_and_errors() {
        let by_id = [
            BatchInput { body: json!({}), names: Names::Id { id: "11".into(), trace: "t0".into() } },
            BatchInput { body: json!({}), names: Names::Id { id: "12".into(), trace: "t1".into() } },
        ];
        check(
            &by_id,
            json!({"results": [{"id": "12"}], "errors": [{"message": "not found", "context": {"ids": ["11"]}}]}),
            &[Err("not found"), Ok("12")],
        );
        let pairs = [
            BatchInput { body: json!({}), names: Names::Pair { from: "1".into(), to: "9".into() } },
            BatchInput { body: json!({}), names: Names::Pair { from: "2".into(), to: "9".into() } },
        ];
        check(
            &pairs,
            json!({"results": [{"id": "x", "from": {"id": "2"}, "to": {"id": 9}}],
                   "errors": [{"message": "no note 1", "context": {"fromObjectId": ["1"]}}]}),
            &[Err("no note 1"), Ok("x")],
        );
    }
}
