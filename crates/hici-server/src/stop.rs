//! Stop sequences on streamed text: nothing from a stop sequence on is ever sent, and text that
//! might be the start of one is held back until it is known not to be.

/// Filters streamed pieces against stop sequences (OpenAI semantics: the stop sequence and
/// everything after it are not part of the output).
#[derive(Debug, Clone)]
pub struct StopFilter {
    stops: Vec<String>,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl StopFilter {
    /// `stops`: the sequences (empty ones are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            text: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// Whether a stop sequence was seen.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a piece; returns the text that is now safe to send.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.text.push_str(piece);
        let end = match self.first_stop() {
            Some(i) => {
                self.stopped = true;
                i
            }
            None => self.text.len() - self.held_back(),
        };
        self.take_to(end)
    }

    /// The held-back rest at the end of the stream.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        self.take_to(self.text.len())
    }

    /// `text` cut before its first stop sequence.
    pub fn truncate(text: &str, stops: &[String]) -> String {
        let mut f = Self::new(stops);
        let mut out = f.push(text);
        out.push_str(&f.finish());
        out
    }

    fn take_to(&mut self, end: usize) -> String {
        let end = end.max(self.emitted);
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }

    fn first_stop(&self) -> Option<usize> {
        // a stop may straddle what was already sent only if it started in the held-back part,
        // which was never sent; search from the earliest place a stop could begin
        self.stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
    }

    /// Bytes at the end of the text that are a proper prefix of some stop sequence.
    fn held_back(&self) -> usize {
        let mut hold = 0;
        for s in &self.stops {
            for k in (1..s.len()).rev() {
                if k <= hold {
                    break;
                }
                if s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                    hold = k;
                    break;
                }
            }
        }
        hold.min(self.text.len() - self.emitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut f = StopFilter::new(&stops);
        let mut out = String::new();
        for p in pieces {
            out.push_str(&f.push(p));
        }
        out.push_str(&f.finish());
        (out, f.stopped())
    }

    #[test]
    fn stop_split_over_pieces_is_never_sent() {
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "Dxyz"]),
            ("abc".into(), true)
        );
        assert_eq!(run(&["END"], &["abc", "EN", "x"]), ("abcENx".into(), false));
        assert_eq!(
            run(&["\n\n", "##"], &["a\n", "b#", "#c"]),
            ("a\nb".into(), true)
        );
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&[""], &["a"]), ("a".into(), false));
    }

    #[test]
    fn held_back_text_is_released_when_it_diverges() {
        let stops = vec!["STOP".to_string()];
        let mut f = StopFilter::new(&stops);
        assert_eq!(f.push("xST"), "x");
        assert_eq!(f.push("O"), "");
        assert_eq!(f.push("x"), "STOx");
        assert_eq!(f.finish(), "");
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
        assert_eq!(run(&["éa"], &["é", "b"]), ("éb".into(), false));
        assert_eq!(
            StopFilter::truncate("Paris.\nQ:", &["\nQ".into()]),
            "Paris."
        );
    }
}
