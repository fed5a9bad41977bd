//! Value types of the domain. Each has a private field and a `parse` (or `new`) that is the only
//! way to build one, so a value that exists is a valid value ("parse, don't validate").

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a raw value could not become a domain value. The message is short and lowercase so the
/// HTTP layer can show it next to the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The SKU is empty, longer than 64 characters or has a character outside `[A-Za-z0-9._-]`.
    #[error("must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")]
    InvalidSku,
    /// The quantity is zero, negative or above the allowed maximum.
    #[error("must be between 1 and {max}")]
    QuantityOutOfRange {
        /// The largest quantity allowed here.
        max: u32,
    },
    /// The currency is not an active ISO 4217 code.
    #[error("must be an ISO 4217 currency code such as EUR or USD")]
    UnknownCurrency,
    /// A money amount is negative where only zero or more makes sense.
    #[error("must not be negative")]
    NegativeAmount,
    /// A price is zero or negative: everything the catalog sells costs at least one minor unit,
    /// because a payment of nothing cannot be authorized (see the fulfillment saga).
    #[error("must be at least 1")]
    NotPositive,
    /// A text is empty (or only blanks) or longer than allowed.
    #[error("must be 1-{max} characters")]
    TextLength {
        /// The longest text allowed here.
        max: usize,
    },
    /// A text has control characters.
    #[error("must not contain control characters")]
    ControlCharacters,
}

/// A stock keeping unit: 1-64 characters of `[A-Za-z0-9._-]`. Case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sku(String);

impl Sku {
    /// Longest SKU accepted.
    pub const MAX_LEN: usize = 64;

    /// Parses a SKU.
    ///
    /// # Errors
    /// [`ValueError::InvalidSku`] unless `raw` is 1-64 characters of `[A-Za-z0-9._-]`.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if raw.is_empty() || raw.len() > Self::MAX_LEN || !raw.chars().all(valid_char) {
            return Err(ValueError::InvalidSku);
        }
        Ok(Self(raw.to_owned()))
    }

    /// The SKU as text; it is also the inventory aggregate's id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Sku {
    type Error = ValueError;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

impl From<Sku> for String {
    fn from(sku: Sku) -> Self {
        sku.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A positive count of units, at most [`Quantity::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Quantity(u32);

impl Quantity {
    /// Largest quantity a single command may move (a restock, an adjustment, a reservation).
    pub const MAX: u32 = 1_000_000;

    /// Parses a quantity no larger than `max` (itself capped at [`Quantity::MAX`]).
    ///
    /// # Errors
    /// [`ValueError::QuantityOutOfRange`] when `raw` is below 1 or above `max`.
    pub fn parse_at_most(raw: i64, max: u32) -> Result<Self, ValueError> {
        let max = max.min(Self::MAX);
        match u32::try_from(raw) {
            Ok(n) if (1..=max).contains(&n) => Ok(Self(n)),
            _ => Err(ValueError::QuantityOutOfRange { max }),
        }
    }

    /// Parses a quantity between 1 and [`Quantity::MAX`].
    ///
    /// # Errors
    /// [`ValueError::QuantityOutOfRange`] when out of that range.
    pub fn parse(raw: i64) -> Result<Self, ValueError> {
        Self::parse_at_most(raw, Self::MAX)
    }

    /// The number of units.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The number of units, widened for stock arithmetic.
    pub fn units(self) -> u64 {
        u64::from(self.0)
    }
}

impl TryFrom<u32> for Quantity {
    type Error = ValueError;
    fn try_from(raw: u32) -> Result<Self, Self::Error> {
        Self::parse(i64::from(raw))
    }
}

impl From<Quantity> for u32 {
    fn from(q: Quantity) -> Self {
        q.0
    }
}

/// Active ISO 4217 alphabetic codes. Kept as one string so the list reads like the standard.
const ISO_4217: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB \
BRL BSD BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD \
FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR \
KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR \
MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK \
SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VES \
VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG";

/// An ISO 4217 currency code such as `EUR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    /// Parses an upper-case ISO 4217 code.
    ///
    /// # Errors
    /// [`ValueError::UnknownCurrency`] unless `raw` is an active ISO 4217 code.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        let bytes: [u8; 3] = raw
            .as_bytes()
            .try_into()
            .map_err(|_| ValueError::UnknownCurrency)?;
        if !bytes.iter().all(u8::is_ascii_uppercase) || !ISO_4217.split(' ').any(|c| c == raw) {
            return Err(ValueError::UnknownCurrency);
        }
        Ok(Self(bytes))
    }

    /// The three-letter code.
    pub fn code(&self) -> &str {
        // The bytes were checked to be ASCII upper-case letters in `parse`.
        std::str::from_utf8(&self.0).unwrap_or("XXX")
    }
}

impl TryFrom<String> for Currency {
    type Error = ValueError;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> Self {
        c.code().to_owned()
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A non-negative amount of money in the currency's minor units (cents for EUR). Never a float.
/// Serialized as `{"amount_minor": 1250, "currency": "EUR"}`, the shape of the HTTP contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "MoneyFields")]
pub struct Money {
    amount_minor: i64,
    currency: Currency,
}

/// Why two amounts of money could not be combined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// The amounts are in different currencies.
    #[error("currencies differ: {0} and {1}")]
    CurrencyMismatch(Currency, Currency),
    /// The result does not fit in an `i64` of minor units.
    #[error("amount too large")]
    Overflow,
}

/// The wire shape of [`Money`], checked by `TryFrom` so a stored or received negative amount
/// never becomes a `Money`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoneyFields {
    amount_minor: i64,
    currency: Currency,
}

impl TryFrom<MoneyFields> for Money {
    type Error = ValueError;
    fn try_from(raw: MoneyFields) -> Result<Self, Self::Error> {
        Money::new(raw.amount_minor, raw.currency)
    }
}

impl Money {
    /// Builds an amount.
    ///
    /// # Errors
    /// [`ValueError::NegativeAmount`] when `amount_minor` is below zero.
    pub fn new(amount_minor: i64, currency: Currency) -> Result<Self, ValueError> {
        if amount_minor < 0 {
            return Err(ValueError::NegativeAmount);
        }
        Ok(Self {
            amount_minor,
            currency,
        })
    }

    /// A price: at least one minor unit.
    ///
    /// # Errors
    /// [`ValueError::NotPositive`] when `amount_minor` is zero or below.
    pub fn price(amount_minor: i64, currency: Currency) -> Result<Self, ValueError> {
        if amount_minor < 1 {
            return Err(ValueError::NotPositive);
        }
        Self::new(amount_minor, currency)
    }

    /// Zero in `currency`.
    pub fn zero(currency: Currency) -> Self {
        Self {
            amount_minor: 0,
            currency,
        }
    }

    /// The amount in minor units.
    pub fn amount_minor(&self) -> i64 {
        self.amount_minor
    }

    /// The currency.
    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// `self + other`.
    ///
    /// # Errors
    /// [`MoneyError::CurrencyMismatch`] or [`MoneyError::Overflow`].
    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch(self.currency, other.currency));
        }
        let amount_minor = self
            .amount_minor
            .checked_add(other.amount_minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money {
            amount_minor,
            ..self
        })
    }

    /// `self * quantity`.
    ///
    /// # Errors
    /// [`MoneyError::Overflow`] when the product does not fit.
    pub fn checked_mul(self, quantity: Quantity) -> Result<Money, MoneyError> {
        let amount_minor = self
            .amount_minor
            .checked_mul(i64::from(quantity.get()))
            .ok_or(MoneyError::Overflow)?;
        Ok(Money {
            amount_minor,
            ..self
        })
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (minor units)", self.amount_minor, self.currency)
    }
}

/// An order's id. The order aggregate, its payment and its reservations are all keyed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(Uuid);

impl OrderId {
    /// The id as a UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl From<Uuid> for OrderId {
    fn from(id: Uuid) -> Self {
        Self(id)
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Checks a free text: trimmed, 1..=max characters, no control characters.
fn parse_text(raw: &str, max: usize) -> Result<String, ValueError> {
    let text = raw.trim();
    if text.is_empty() || text.chars().count() > max {
        return Err(ValueError::TextLength { max });
    }
    if text.chars().any(char::is_control) {
        return Err(ValueError::ControlCharacters);
    }
    Ok(text.to_owned())
}

macro_rules! text_value {
    ($(#[$doc:meta])* $name:ident, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Longest text accepted, in characters.
            pub const MAX_LEN: usize = $max;

            /// Parses the text: surrounding blanks are trimmed.
            ///
            /// # Errors
            /// [`ValueError::TextLength`] or [`ValueError::ControlCharacters`].
            pub fn parse(raw: &str) -> Result<Self, ValueError> {
                parse_text(raw, Self::MAX_LEN).map(Self)
            }

            /// The text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValueError;
            fn try_from(raw: String) -> Result<Self, Self::Error> {
                Self::parse(&raw)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> Self {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

/// The customer placing an order: the `sub` of their token, exactly as the identity provider
/// gave it. Subjects are opaque: never trimmed or normalised, so `"alice "` is not `"alice"`;
/// one that could be mistaken for another (surrounding blanks) or that holds control characters
/// is refused, and so is the token that carries it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CustomerId(String);

impl CustomerId {
    /// Longest subject accepted, in characters.
    pub const MAX_LEN: usize = 255;

    /// Takes a subject as it is.
    ///
    /// # Errors
    /// [`ValueError::TextLength`] for an empty or over-long subject or one with surrounding
    /// blanks, [`ValueError::ControlCharacters`] for one with control characters.
    pub fn parse(raw: &str) -> Result<Self, ValueError> {
        if raw.chars().any(char::is_control) {
            return Err(ValueError::ControlCharacters);
        }
        if raw.is_empty() || raw.chars().count() > Self::MAX_LEN || raw.trim() != raw {
            return Err(ValueError::TextLength { max: Self::MAX_LEN });
        }
        Ok(Self(raw.to_owned()))
    }

    /// The subject.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CustomerId {
    type Error = ValueError;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

impl From<CustomerId> for String {
    fn from(v: CustomerId) -> Self {
        v.0
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

text_value!(
    /// A product's display name.
    ProductName,
    200
);
text_value!(
    /// A free-text reason or note given by an operator (adjustments, restocks, cancellations).
    Reason,
    500
);
text_value!(
    /// An opaque payment method token for the payment gateway (e.g. `tok_visa`).
    PaymentToken,
    255
);
text_value!(
    /// A shipping address as one free text.
    ShippingAddress,
    1000
);
text_value!(
    /// A carrier name or tracking reference given when shipping.
    ShippingLabel,
    200
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sku_accepts_the_documented_alphabet_only() {
        assert!(Sku::parse("ABC-123_x.y").is_ok());
        assert_eq!(Sku::parse(""), Err(ValueError::InvalidSku));
        assert_eq!(Sku::parse("a b"), Err(ValueError::InvalidSku));
        assert_eq!(Sku::parse(&"a".repeat(65)), Err(ValueError::InvalidSku));
        assert!(Sku::parse(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn a_quantity_is_positive_and_bounded() {
        assert!(Quantity::parse(0).is_err());
        assert!(Quantity::parse(-1).is_err());
        assert_eq!(
            Quantity::parse_at_most(10_000, 10_000).map(Quantity::get),
            Ok(10_000)
        );
        assert!(Quantity::parse_at_most(10_001, 10_000).is_err());
    }

    #[test]
    fn only_active_iso_4217_codes_are_currencies() {
        assert!(Currency::parse("EUR").is_ok());
        assert!(Currency::parse("eur").is_err());
        assert!(Currency::parse("EU").is_err());
        assert!(Currency::parse("ABC").is_err());
    }

    #[test]
    fn money_never_mixes_currencies() {
        let eur = Currency::parse("EUR").unwrap();
        let usd = Currency::parse("USD").unwrap();
        let a = Money::new(100, eur).unwrap();
        assert!(matches!(
            a.checked_add(Money::new(1, usd).unwrap()),
            Err(MoneyError::CurrencyMismatch(..))
        ));
        assert_eq!(a.checked_add(a).unwrap().amount_minor(), 200);
        assert!(Money::new(-1, eur).is_err());
        assert_eq!(
            Money::new(i64::MAX, eur)
                .unwrap()
                .checked_mul(Quantity::parse(2).unwrap()),
            Err(MoneyError::Overflow)
        );
    }

    #[test]
    fn texts_are_trimmed_and_bounded() {
        assert_eq!(Reason::parse("  damaged ").unwrap().as_str(), "damaged");
        assert!(Reason::parse("   ").is_err());
        assert!(Reason::parse("a\u{7}b").is_err());
        assert!(ProductName::parse(&"x".repeat(201)).is_err());
    }

    #[test]
    fn customer_ids_are_taken_as_sent_never_trimmed() {
        assert_eq!(CustomerId::parse("alice").unwrap().as_str(), "alice");
        assert_eq!(CustomerId::parse("a b").unwrap().as_str(), "a b");
        assert!(CustomerId::parse("alice ").is_err());
        assert!(CustomerId::parse(" alice").is_err());
        assert!(CustomerId::parse("al\0ice").is_err());
        assert!(CustomerId::parse("").is_err());
        assert!(CustomerId::parse(&"x".repeat(256)).is_err());
    }

    #[test]
    fn a_price_is_at_least_one_minor_unit() {
        let eur = Currency::parse("EUR").unwrap();
        assert!(Money::price(0, eur).is_err());
        assert!(Money::price(-5, eur).is_err());
        assert_eq!(Money::price(1, eur).unwrap().amount_minor(), 1);
    }
}
