//! `ln`, `exp` and `pow` for `no_std` (no libm), accurate to ~1e-14.

const LN2: f64 = core::f64::consts::LN_2;

/// Natural logarithm for x > 0.
pub fn ln(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x.is_infinite() {
        return x;
    }
    // x = m * 2^e with m in [1, 2).
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if e == -1023 {
        // Subnormal: normalise.
        let n = x * (1u64 << 52) as f64;
        return ln(n) - 52.0 * LN2;
    }
    // Centre m around 1 for faster convergence: m in [sqrt(1/2), sqrt(2)).
    if m > core::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln(m) = 2 atanh(s), s = (m-1)/(m+1), |s| < 0.172: 2 sum s^(2k+1)/(2k+1);
    // s^2 < 0.03, so 12 terms reach 1e-18 (Horner form, no divisions).
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = 0.0;
    let mut k = LN_TERMS;
    while k > 0 {
        k -= 1;
        p = p * s2 + INV_ODD[k];
    }
    2.0 * s * p + e as f64 * LN2
}

const LN_TERMS: usize = 12;
/// 1/(2k+1).
const INV_ODD: [f64; LN_TERMS] = {
    let mut t = [0.0; LN_TERMS];
    let mut k = 0;
    while k < LN_TERMS {
        t[k] = 1.0 / (2 * k + 1) as f64;
        k += 1;
    }
    t
};

const EXP_TERMS: usize = 16;
/// 1/k!.
const INV_FACT: [f64; EXP_TERMS] = {
    let mut t = [1.0; EXP_TERMS];
    let mut k = 1;
    while k < EXP_TERMS {
        t[k] = t[k - 1] / k as f64;
        k += 1;
    }
    t
};

/// e^x.
pub fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > 709.0 {
        return f64::INFINITY;
    }
    if x < -745.0 {
        return 0.0;
    }
    // x = k ln2 + r, |r| <= ln2/2.
    let k = (x / LN2 + if x < 0.0 { -0.5 } else { 0.5 }) as i64;
    let r = x - k as f64 * LN2;
    // |r| < 0.35: 16 Taylor terms reach 1e-19 (Horner form).
    let mut sum = 0.0;
    let mut i = EXP_TERMS;
    while i > 0 {
        i -= 1;
        sum = sum * r + INV_FACT[i];
    }
    // Scale by 2^k in two steps to stay in range.
    let k1 = k / 2;
    let k2 = k - k1;
    sum * pow2(k1) * pow2(k2)
}

fn pow2(k: i64) -> f64 {
    f64::from_bits(((k + 1023).clamp(1, 2046) as u64) << 52)
}

/// x^y for x > 0.
pub fn pow(x: f64, y: f64) -> f64 {
    if y == 0.0 {
        return 1.0;
    }
    if x == 0.0 {
        return 0.0;
    }
    exp(y * ln(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_against_std() {
        let xs = [1e-300, 1e-10, 0.001, 0.5, 0.999, 1.0, 1.5, 2.0, 10.0, 12345.678, 1e20, 1e300];
        for &x in &xs {
            let (a, b) = (ln(x), x.ln());
            assert!((a - b).abs() <= 1e-13 * b.abs().max(1.0), "ln({x}) = {a}, std {b}");
        }
        for &x in &[-700.0, -20.0, -1.0, -1e-9, 0.0, 0.3, 1.0, 5.5, 100.0, 700.0] {
            let (a, b) = (exp(x), f64::exp(x));
            assert!((a - b).abs() <= 1e-13 * b.abs(), "exp({x}) = {a}, std {b}");
        }
        for &(x, y) in &[(2.0, 10.0), (0.5, 0.99), (1000.0, -0.99), (3.0, 0.01), (1e6, 50.0)] {
            let (a, b) = (pow(x, y), f64::powf(x, y));
            assert!((a - b).abs() <= 1e-11 * b.abs(), "pow({x},{y}) = {a}, std {b}");
        }
        // A dense sweep: ln over 1e-12..1e12, exp over -50..50.
        for i in 0..20_000 {
            let x = f64::powf(10.0, -12.0 + 24.0 * i as f64 / 20_000.0);
            let (a, b) = (ln(x), x.ln());
            assert!((a - b).abs() <= 1e-14 * b.abs().max(1.0), "ln({x}) = {a}, std {b}");
            let y = -50.0 + 100.0 * i as f64 / 20_000.0;
            let (a, b) = (exp(y), y.exp());
            assert!((a - b).abs() <= 1e-14 * b, "exp({y}) = {a}, std {b}");
        }
        assert!(ln(-1.0).is_nan());
        assert_eq!(ln(0.0), f64::NEG_INFINITY);
    }
}
